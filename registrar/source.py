"""Reading a configuration source: YAML and ${VAR} interpolation, before any
validation. Light on purpose (no pydantic): `registrar prestop` reads its
control address through it."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError


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
    import yaml

    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read {name}: {exc.strerror}") from exc
    if len(data) > MAX_BYTES:
        raise ConfigError("", f"{name}: larger than {MAX_BYTES >> 20} MiB: not a configuration")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{name}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_loader()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"{os.fspath(path)}: invalid YAML{where}: {problem}") from exc


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _loader():
    """PyYAML's safe loader with a nesting limit (its composer recurses: a
    few thousand ``[`` would end in RecursionError)."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

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
        return {k: _interpolate(v, env, _join(path, k), budget, depth + 1)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]", budget, depth + 1)
                for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

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
        import yaml

        try:
            typed = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(typed, (bool, int, float)):
            return typed
    return text


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def parse_listen(value: str) -> tuple[str, int] | str:
    """``"host:port"`` -> (host, port); ``"unix:/path"`` -> "/path"."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f'expected "unix:/absolute/path.sock", got {value!r}')
        return path
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'expected "host:port" or "unix:/path.sock", got {value!r}')
    return host, int(port)
