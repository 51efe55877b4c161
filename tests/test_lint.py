"""The lint step's own rule, which ruff has not: every ``# noqa`` says which
rule it silences and why, e.g. ``# noqa: BLE001 - a failed drain must not stop
removal``. Ruff refuses a noqa without a code (PGH004) and one that silences
nothing (RUF100); the reason is checked here. `./dev lint` runs this module
after ruff."""
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What .gitignore keeps out (and ruff with it), plus every dot-directory.
SKIP = {"build", "dist", "__pycache__"}

NOQA = re.compile(r"#\s*noqa", re.IGNORECASE)
#: The directive, its codes as ruff reads them (comma-separated), " - " and a reason.
EXPLAINED = re.compile(r"#\s*noqa: [A-Z]+[0-9]+(?:, [A-Z]+[0-9]+)* - \S")


def python_files(root: Path) -> list[Path]:
    out = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts[:-1]
        if not any(p.startswith(".") or p in SKIP or p.endswith(".egg-info") for p in parts):
            out.append(path)
    return sorted(out)


def unexplained(source: str) -> list[int]:
    """The lines whose noqa comment lacks its code or its reason (comments
    only: a string that mentions noqa is no directive)."""
    lines = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and NOQA.search(tok.string):
            if not EXPLAINED.search(tok.string):
                lines.append(tok.start[0])
    return lines


@pytest.mark.parametrize("comment", [
    "# noqa: BLE001 - a failed drain must not stop removal",
    "# noqa: S506 - a SafeLoader subclass",
    "# noqa: F401, E402 - imported for its side effect, after the path is set",
    "# why it is so  # noqa: G003 - the caller's own %-format",
])
def test_a_noqa_with_its_code_and_reason_passes(comment):
    assert unexplained(f"x = 1  {comment}\n") == []


@pytest.mark.parametrize("comment", [
    "# noqa",
    "# NOQA",
    "# noqa: BLE001",
    "# noqa: BLE001 -",
    "# noqa:BLE001 - no space, which ruff reads but this tree does not write",
    "# noqa: blind except",
    "# noqa - the reason without the code",
])
def test_a_noqa_without_its_code_or_reason_fails(comment):
    assert unexplained(f"try:\n    pass\nexcept Exception:  {comment}\n    pass\n") == [3]


def test_a_string_that_mentions_noqa_is_no_directive():
    assert unexplained('HELP = "write # noqa: CODE - why"\n') == []


def test_every_noqa_in_the_tree_names_its_code_and_why():
    found = [f"{path.relative_to(ROOT)}:{line}"
             for path in python_files(ROOT)
             for line in unexplained(path.read_text(encoding="utf-8"))]
    assert not found, ("write `# noqa: CODE - why` (or fix the finding) at: "
                       + ", ".join(found))
