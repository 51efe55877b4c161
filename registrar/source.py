"""Reading a configuration source: YAML and ${VAR} interpolation, before any
validation. Light on purpose (no pydantic): `registrar prestop` reads its
control address through it."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError


def expand(source: str | os.PathLike | Mapping[str, Any],
           environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The configuration as read and interpolated, before validation."""
    raw = _read(source) if not isinstance(source, Mapping) else dict(source)
    if not isinstance(raw, Mapping):
        raise ConfigError("", "the configuration must be a mapping at the top level")
    return _interpolate(raw, os.environ if environ is None else environ, "")


def _read(path: str | os.PathLike) -> Any:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {os.fspath(path)}: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"{os.fspath(path)}: invalid YAML{where}: {problem}") from exc


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, env: Mapping[str, str], path: str) -> Any:
    """Expand ${VAR} and ${VAR:-default} in string values ($$ is a literal $).
    A value that is one reference alone takes the type its text reads as in
    YAML, so ``port: ${PORT}`` gives a number."""
    if isinstance(node, Mapping):
        return {k: _interpolate(v, env, _join(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
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
