"""Reading a configuration source: YAML and ${VAR} interpolation, before any
validation. Light on purpose (no pydantic): `registrar prestop` reads its
control address through it."""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .text import join_key, printable, show


#: Limits that turn a hostile file into one line instead of a traceback or
#: gigabytes: the file's size, the nesting depth, and the number of values
#: once YAML aliases are expanded (a "billion laughs" file is small).
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 10_000


def expand(source: str | os.PathLike | Mapping[str, Any],
           environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The configuration as read and interpolated, before validation."""
    raw = _read(source) if not isinstance(source, Mapping) else dict(source)
    if not isinstance(raw, Mapping):
        raise ConfigError("", "the configuration must be a mapping at the top level")
    return _interpolate(raw, os.environ if environ is None else environ, "", _Budget())


def _read(path: str | os.PathLike) -> Any:
    name = printable(os.fsdecode(path))
    if name == "-":  # `-c -`: the configuration on standard input
        name, data = "<stdin>", _stdin()
    else:
        from .files import NotRegular, TooLarge, read_regular

        try:
            data = read_regular(path, MAX_BYTES)
        except OSError as exc:
            raise ConfigError("", f"cannot read {name}: {exc.strerror}") from exc
        except NotRegular as exc:
            raise ConfigError("", f"cannot read {name}: {exc}") from None
        except TooLarge:
            data = None
    if data is None or len(data) > MAX_BYTES:  # the file, or standard input
        raise ConfigError("", f"{name}: larger than {MAX_BYTES >> 20} MiB: not a configuration")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{name}: not UTF-8 text (byte {exc.start})") from None
    return parse_text(text, name)


def parse_text(text: str, name: str) -> Any:
    """A configuration's YAML text, parsed as a file's is (limits, duplicate
    keys refused); ``name`` says where it came from in the one-line
    ConfigError. Not interpolated, not validated."""
    import yaml

    if len(text) > MAX_BYTES:
        raise ConfigError("", f"{name}: larger than {MAX_BYTES >> 20} MiB: not a configuration")
    try:
        return yaml.load(text, Loader=_loader()) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"{name}: invalid YAML{where}: {printable(problem)}") from None


_STDIN: list[bytes] = []


def _stdin() -> bytes:
    """Standard input, read once (a command may read its config twice)."""
    if not _STDIN:
        _STDIN.append(sys.stdin.buffer.read(MAX_BYTES + 1))
    return _STDIN[0]


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _loader():
    """PyYAML's safe loader with a nesting limit (its composer recurses: a
    few thousand ``[`` would end in RecursionError), whose constructors'
    errors (``2001-02-30``, an integer of 5,000 digits, an empty ``!!int``)
    are YAML errors with a line instead of a bare ValueError or IndexError."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            except (yaml.YAMLError, ConfigError):
                raise
            except Exception as exc:  # noqa: BLE001 - "!!int " ends in IndexError, and so on
                reason = str(exc).split(":")[0] or type(exc).__name__
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value: {reason}",
                    node.start_mark) from None

        def construct_mapping(self, node, deep=False):
            # A key written twice is refused: the last one would win silently
            # (a merge key's entries, which the mapping may override, are not
            # written keys).
            seen = {}
            for key_node, _value in node.value:
                if isinstance(key_node, yaml.ScalarNode) and \
                        key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r} (first on line "
                                        f"{seen[key] + 1})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ConfigError("", f"nested deeper than {MAX_DEPTH} levels "
                                          f"(line {mark.line + 1}): not a configuration")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader


class _Budget:
    """How many values the interpolation may still visit."""

    def __init__(self) -> None:
        self.left = MAX_VALUES

    def spend(self, path: str, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise ConfigError(path, f"more than {MAX_VALUES} values (YAML aliases expanded): "
                                    "not a configuration")
        if depth > MAX_DEPTH:
            raise ConfigError(path, f"nested deeper than {MAX_DEPTH} levels")


def _interpolate(node: Any, env: Mapping[str, str], path: str, budget: _Budget,
                 depth: int = 0) -> Any:
    """Expand ${VAR} and ${VAR:-default} in string values ($$ is a literal $).
    A value that is one reference alone takes the type its text reads as in
    YAML, so ``port: ${PORT}`` gives a number."""
    budget.spend(path, depth)
    if isinstance(node, Mapping):
        return {k: _interpolate(v, env, join_key(path, k), budget, depth + 1)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]", budget, depth + 1)
                for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    _check_references(node, path)

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ConfigError(path, f"environment variable {name} is not set "
                                f"(write ${{{name}:-default}} to give a default)")

    text = _VAR.sub(substitute, node)
    if _VAR.fullmatch(node) and node != "$$":
        return _typed(text)
    return text


def _check_references(text: str, path: str) -> None:
    """ConfigError for a ``${`` that is not a whole ``${NAME}`` or
    ``${NAME:-default}`` (``${}``, ``${A``, ``${ A }``, ``${A${B}}``, a
    reference inside a default): kept as literal text, it would become a
    service name or an address without a word."""
    pos = 0
    while (pos := text.find("$", pos)) >= 0:
        if text.startswith("$$", pos):
            pos += 2
            continue
        if not text.startswith("${", pos):
            pos += 1
            continue
        m = _VAR.match(text, pos)
        if m is None or "$" in (m.group(2) or ""):
            end = text.find("}", pos)
            bad = text[pos:end + 1] if end >= 0 else text[pos:]
            raise ConfigError(path, f"malformed reference {show(bad)}: expected ${{NAME}} or "
                                    f"${{NAME:-default}} (a default holds no reference; $$ "
                                    f"is a literal $)")
        pos = m.end()


def _typed(text: str) -> Any:
    """``text`` as a number or a boolean when YAML would read it as one,
    else the text. Only a plain scalar is ever parsed: a variable holding
    ``[[[...`` or an alias bomb stays text."""
    import yaml

    plain = text.strip()
    tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, plain, (True, False))
    if tag.rsplit(":", 1)[-1] not in ("int", "float", "bool"):
        return text
    try:
        return yaml.safe_load(plain)
    except (yaml.YAMLError, ValueError, OverflowError):  # an integer of 5,000 digits
        return text


#: One ``--set`` key: dotted names, each optionally indexing a list
#: (``stop.grace_period``, ``backends[0].ttl``).
_SEGMENT = re.compile(r"([^.\[\]=\s]+)(?:\[([0-9]+)\])?")


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line -> (key, value). The value is
    read as a YAML scalar would be (``30`` a number, ``true`` a boolean,
    ``null`` or nothing at all null, ``'30'`` text, anything else text as
    written); ``${VAR}`` is left for the interpolation. ValueError with a
    one-line reason otherwise."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, e.g. stop.grace_period=30s, got {show(text)}")
    if not all(_SEGMENT.fullmatch(part) for part in key.split(".")):
        raise ValueError(f"expected a dotted key like stop.grace_period or backends[0].ttl, "
                         f"got {show(key)}")
    return key, _scalar(raw)


#: What PyYAML's resolver reads as a boolean, a number or null in a plain
#: scalar (its own expressions): matched here so that the preStop hook,
#: whose settings are text, starts without importing PyYAML (~30 ms).
_NOT_TEXT = re.compile(
    r"yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
    r"|~|null|Null|NULL|"
    r"|[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
    r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+"
    r"|[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


def _scalar(raw: str) -> Any:
    plain = raw.strip()
    if plain[:1] not in ("'", '"') and not _NOT_TEXT.fullmatch(plain):
        return raw
    import yaml

    try:
        value = yaml.safe_load(plain)
    except (yaml.YAMLError, ValueError, OverflowError):
        value = raw if plain[:1] not in ("'", '"') else None
    if plain[:1] in ("'", '"') and not isinstance(value, str):
        raise ValueError(f"expected a quoted text, got {show(raw)}")
    return value


def with_settings(source: str | os.PathLike | Mapping[str, Any] | None,
                  settings: Sequence[tuple[str, Any]] | Sequence[str] = ()
                  ) -> str | os.PathLike | Mapping[str, Any] | None:
    """The configuration ``source`` with ``--set`` settings applied over it,
    before interpolation and validation (so that an error names the key as
    it would in the file, and ``${VAR}`` in a value is expanded like the
    file's own). Each setting is ``KEY=VALUE`` or parse_setting()'s pair;
    the last one of a key wins. With no settings ``source`` comes back as
    it is; else a new mapping (``source`` None: the settings alone). Raises
    ConfigError naming the key when the file's value on the way is not a
    mapping (or not a list long enough)."""
    if not settings:
        return source
    if source is None:
        doc: Any = {}
    else:
        doc = _read(source) if not isinstance(source, Mapping) else source
        if not isinstance(doc, Mapping):
            raise ConfigError("", "the configuration must be a mapping at the top level")
    import copy

    doc = copy.deepcopy(dict(doc))
    for setting in settings:
        if isinstance(setting, str):
            try:
                setting = parse_setting(setting)
            except ValueError as exc:
                raise ConfigError("", f"--set: {exc}") from None
        _set(doc, *setting)
    return doc


def _set(doc: dict[str, Any], key: str, value: Any) -> None:
    node: Any = doc
    path = ""
    steps = []
    for part in key.split("."):
        m = _SEGMENT.fullmatch(part)
        if m is None:
            raise ConfigError(key, "expected a dotted key like stop.grace_period")
        steps.append(m.group(1))
        if m.group(2) is not None:
            steps.append(int(m.group(2)))
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                size = f"the list has {len(node)}" if isinstance(node, list) else \
                    f"it is {show(node)}, not a list"
                raise ConfigError(path, f"--set {key}: no item {step} ({size})")
            where = f"{path}[{step}]"
        else:
            where = join_key(path, step)
        if last:
            node[step] = value
            return
        child = node[step] if isinstance(step, int) else node.get(step)
        if child is None and not isinstance(steps[i + 1], int):
            child = node[step] = {}
        elif isinstance(steps[i + 1], int):
            if not isinstance(child, list):
                raise ConfigError(where, f"--set {key}: expected a list, got {show(child)}")
        elif not isinstance(child, Mapping):
            raise ConfigError(where, f"--set {key}: expected a mapping, got {show(child)}")
        elif not isinstance(child, dict):
            child = node[step] = dict(child)
        node, path = child, where


#: The longest path a unix socket address holds (sun_path, less its NUL).
MAX_UNIX_PATH = 107
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.%A-Za-z]+\]")


def parse_listen(value: Any, any_port: bool = True) -> tuple[str, int] | str:
    """``"host:port"`` -> (host, port); ``"unix:/path"`` -> "/path". Port 0
    (any free port) only with ``any_port``, for a server that reports where
    it listens. ValueError with a one-line reason otherwise."""
    low = 0 if any_port else 1
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port" or "unix:/path.sock", got {show(value)}')
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        try:
            size = len(os.fsencode(path))
        except UnicodeError:  # a lone surrogate
            size = MAX_UNIX_PATH + 1
        if not path.startswith("/") or not path.isprintable() or size > MAX_UNIX_PATH:
            raise ValueError(f'expected "unix:/absolute/path.sock" (at most {MAX_UNIX_PATH} '
                             f"bytes), got {show(value)}")
        return path
    host, sep, port = value.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not (port.isascii() and port.isdigit()) \
            or len(port) > 5 or not low <= int(port) <= 65535:
        raise ValueError(f'expected "host:port" (port {low}..65535) or "unix:/path.sock", '
                         f"got {show(value)}")
    host = host[1:-1] if host.startswith("[") else host
    return host, int(port)

