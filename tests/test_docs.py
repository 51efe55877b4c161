"""The docs hold together: every relative link and anchor points at
something, every page is reachable from README.md, docs/configuration.md is
what the config models say, and what the pages show as agent configs and
commands works.

Conventions (CONTRIBUTING.md, "Docs that stay true"):
- a ```yaml block whose first line is a comment naming ``agent.yaml``
  (``# agent.yaml``, ``# /etc/registrar/agent.yaml``, ``# agent.yaml: no
  backends``) is a whole agent configuration: it must pass ``registrar
  check --offline`` as written;
- a ```yaml block without that line whose keys are all agent config
  sections (a ``backends:`` excerpt) must validate against the JSON Schema;
- a ``registrar ...`` command in a ```sh or ```console block must parse;
  a ``bench/*.py`` command must name options the script has;
- a repository path in a code span (``tests/...``, ``bench/...``,
  ``config/...``) must exist.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from registrar import cli, docgen

ROOT = Path(__file__).resolve().parent.parent


def pages() -> list[Path]:
    """Every Markdown page the project ships, README.md first."""
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md",
             *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("backends/*/README.md")),
             ROOT / "testing" / "README.md"]
    return [p for p in found if p.is_file()]


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


# -- Markdown, as GitHub reads it ------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def paragraphs(text: str) -> list[str]:
    """The prose in paragraphs, each one line (a link or a code span may
    break across lines)."""
    out, current = [], []
    for line in prose(text) + [""]:
        if line.strip() and not HEADING.match(line):
            current.append(line.strip())
            continue
        if current:
            out.append(" ".join(current))
        current = [line] if HEADING.match(line) else []
    return out


def spans(page: Path) -> list[str]:
    """The page's code spans."""
    return [span for para in paragraphs(page.read_text()) for _, span in CODE_SPAN.findall(para)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation
    dropped (letters, digits, ``_`` and ``-`` kept), spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(path: Path) -> list[str]:
    targets = []
    for para in paragraphs(path.read_text()):
        targets += LINK.findall(CODE_SPAN.sub("code", para))
    return targets


def resolve(page: Path, target: str) -> tuple[Path | None, str]:
    """(the file or directory a relative link names, its #anchor); None
    for an external link."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None, ""
    where, _, anchor = target.partition("#")
    return (page.parent / where).resolve() if where else page, anchor


def test_the_slugs_are_githubs():
    assert slug("PID-1 wrapper: `registrar run -- app …`") == "pid-1-wrapper-registrar-run----app-"
    assert slug("A rolling restart under load (2026-11-26, before the wait for consumers)") == \
        "a-rolling-restart-under-load-2026-11-26-before-the-wait-for-consumers"
    assert slug("`type: etcd`") == "type-etcd"
    assert slug("An operator's session") == "an-operators-session"


@pytest.mark.parametrize("page", pages(), ids=ids(pages()))
def test_every_relative_link_and_anchor_points_at_something(page):
    broken = []
    for target in links(page):
        path, anchor = resolve(page, target)
        if path is None:
            continue
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
        elif anchor and path.suffix != ".md":
            broken.append(f"{target}: an anchor in a file that is not Markdown")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_every_page_is_reachable_from_the_readme():
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in links(page):
            path, _ = resolve(page, target)
            if path is not None and path.suffix == ".md" and path.is_file():
                todo.append(path)
    unreached = [p for p in pages() if p not in seen]
    assert not unreached, f"not linked from README.md, nor from a page it links: {ids(unreached)}"


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    # The project's two commands, as they work (.ci/run runs the second).
    assert "./dev demo    # " in text and "./dev test    # " in text
    # Which mode to use, on the first screen.
    assert "## Which mode do I pick" in text.split("\n")[:40]


# -- docs/configuration.md -----------------------------------------------------------------

def test_the_configuration_page_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == docgen.markdown(), \
        f"docs/configuration.md is stale: run `{docgen.COMMAND}`"


def test_the_configuration_page_names_every_key():
    """Also the backends' own: every field of every installed model is a row."""
    from registrar import config
    from registrar.discovery import available_backends

    text = (ROOT / "docs" / "configuration.md").read_text()
    for key, model in (("service", config.ServiceConfig), ("stop", config.StopConfig),
                       ("control", config.ControlConfig), ("health", config.HealthConfig),
                       ("heartbeat", config.HeartbeatConfig)):
        for name in model.__struct_fields__:
            assert f"| `{key}.{name}` |" in text, f"{key}.{name}"
    for ep in available_backends().values():
        for name in ep.load().config_model.__struct_fields__:
            assert f"| `{name}` |" in text, f"{ep.name}: {name}"


@pytest.mark.parametrize("backend", ["zookeeper", "consul"])
def test_a_backend_readmes_table_names_the_models_keys(backend):
    """The backend READMEs keep a table of what each key does in the
    registry: it names the model's keys, no more and no fewer."""
    from registrar.discovery import backend_class

    model = backend_class(backend).config_model
    text = (ROOT / "backends" / backend / "README.md").read_text()
    section = text.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            named |= {k.split(".")[0] for k in re.findall(r"`([\w.]+)`", line.split("|")[1])}
    assert named == set(model.__struct_fields__) - {"type", "name"}


# -- what the pages show works ---------------------------------------------------------------

BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
AGENT_CONFIG = re.compile(r"#\s*\S*agent\.yaml\b")
SECTIONS = {"service", "backends", "heartbeat", "stop", "control", "health"}


def blocks(*langs: str) -> list[tuple[str, int, str]]:
    """(page, number, body) of every fenced block in these languages."""
    out = []
    for page in pages():
        for i, (lang, body) in enumerate(BLOCK.findall(page.read_text())):
            if lang in langs:
                out.append((str(page.relative_to(ROOT)), i, body))
    return out


def agent_configs() -> list[tuple[str, int, str]]:
    return [b for b in blocks("yaml") if AGENT_CONFIG.match(b[2].split("\n", 1)[0])]


def config_excerpts() -> list[tuple[str, int, str]]:
    out = []
    for page, i, body in blocks("yaml"):
        if AGENT_CONFIG.match(body.split("\n", 1)[0]):
            continue
        try:
            doc = yaml.safe_load(body)
        except yaml.YAMLError:  # several documents (manifests), or an indented excerpt
            continue
        if isinstance(doc, dict) and doc and set(doc) <= SECTIONS:
            out.append((page, i, body))
    return out


def env() -> dict[str, str]:
    """What a pod's agent would have: the Downward API's variables."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRAR_", "ETCD_",
                                                                       "CONSUL_"))}
    return {**keep, "POD_NAME": "web-0", "POD_IP": "10.244.1.17", "HOST_IP": "10.0.0.2"}


def test_the_pages_hold_agent_configs():
    """The convention is in use (README.md's, docs/library.md's, the
    Service-only one): the test below has something to check."""
    found = {page for page, _, _ in agent_configs()}
    assert {"README.md", "docs/library.md", "docs/modes.md"} <= found, found


@pytest.mark.parametrize("page,number,body", agent_configs(),
                         ids=[f"{p}#{n}" for p, n, _ in agent_configs()])
def test_an_agent_config_passes_registrar_check(page, number, body, tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(body)
    done = subprocess.run([sys.executable, "-m", "registrar", "check", "--offline", "-c",
                           str(path)], capture_output=True, text=True, timeout=60, env=env())
    assert done.returncode == 0, f"{page}, block {number}: {done.stderr}"
    assert ": valid: " in done.stderr


@pytest.mark.parametrize("page,number,body", config_excerpts(),
                         ids=[f"{p}#{n}" for p, n, _ in config_excerpts()])
def test_a_config_excerpt_fits_the_schema(page, number, body):
    schema = json.loads((ROOT / "config" / "registrar.schema.json").read_text())
    doc = {"service": {"name": "web", "port": 8080}, **yaml.safe_load(body)}
    jsonschema.validate(doc, schema)


def commands() -> list[tuple[str, str]]:
    """(page, command) for every simple command of the pages' sh and console
    blocks (continuations joined, prompts and comments dropped, pipelines
    and lists split)."""
    out = []
    for page, _, body in blocks("sh", "shell", "bash", "console"):
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            elif body.lstrip().startswith("$ "):
                continue  # a console block's output
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            command: list[str] = []
            skip = False
            for word in [*words, ";"]:
                if skip:
                    skip = False
                elif word in ("|", "||", "&&", ";", "&"):
                    if command:
                        out.append((page, shlex.join(command)))
                    command = []
                elif re.match(r"^\d*[<>]", word):  # a redirection, and its file
                    skip = bool(re.fullmatch(r"\d*[<>]+", word))
                else:
                    command.append(word)
    for page in pages():  # and the commands written inline: `.venv/bin/python bench/...`
        for span in spans(page):
            if re.match(r"^(\./dev (bench|demo)|((\.venv/bin/)?python3? )?bench/\w+\.py)", span):
                out.append((str(page.relative_to(ROOT)), span))
    return out


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)  # VAR=value before the command
    return words


def registrar_commands() -> list[tuple[str, str]]:
    return [(p, c) for p, c in commands() if _argv(c)[:1] == ["registrar"]]


def bench_commands() -> list[tuple[str, str]]:
    out = []
    for p, c in commands():
        argv = _argv(c)
        if argv[:1] == ["./dev"] and argv[1:2] in (["bench"], ["demo"]):
            script = {"bench": "bench/propagation.py", "demo": "scripts/demo.py"}[argv[1]]
            argv = ["python", script, *argv[2:]]
        if argv[:1] and re.fullmatch(r"bench/\w+\.py", argv[0]):
            argv = ["python", *argv]
        if len(argv) > 1 and argv[0].endswith("python") and \
                argv[1].startswith(("bench/", "scripts/demo.py")):
            out.append((p, shlex.join(argv[1:])))
    return out


def test_the_pages_hold_commands():
    assert len(registrar_commands()) >= 10 and len(bench_commands()) >= 5


@pytest.mark.parametrize("page,command", registrar_commands(),
                         ids=[f"{p}: {c[:60]}" for p, c in registrar_commands()])
def test_a_registrar_command_parses(page, command, capsys):
    try:
        args = cli._parser().parse_args(_argv(command)[1:])
    except SystemExit as exc:  # --version, --help: 0
        assert exc.code == 0, f"{page}: `{command}` does not parse: {capsys.readouterr().err}"
    else:
        assert args.command, command


@functools.cache
def _help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{script} --help: {done.stderr}"
    return done.stdout


@pytest.mark.parametrize("page,command", bench_commands(),
                         ids=[f"{p}: {c[:60]}" for p, c in bench_commands()])
def test_a_bench_or_demo_command_names_options_the_script_has(page, command):
    script, *rest = shlex.split(command)
    assert (ROOT / script).is_file(), f"{page}: {script}"
    text = _help(script)
    for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(rest)):
        assert re.search(rf"(?<![\w-]){option}\b", text), f"{page}: {script} has no {option}"


PATH = re.compile(r"^(?:tests|bench|config|scripts|docs|testing|registrar|backends)/[\w./-]*$")


def test_the_paths_in_code_spans_exist():
    missing = []
    for page in pages():
        for span in spans(page):
            for word in span.split():
                word = word.split("::", 1)[0].rstrip(".,;:)")
                if PATH.match(word) and not (ROOT / word).exists():
                    missing.append(f"{page.relative_to(ROOT)}: {word}")
    assert not missing, "\n".join(missing)
