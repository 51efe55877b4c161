"""Quoting what a user wrote in a one-line message. The standard library
only: the light modules (source, prestop) use it as well as the config."""
from __future__ import annotations

from typing import Any


def printable(text: str) -> str:
    """``text`` with every unprintable character escaped (a newline, a NUL,
    U+2028...), so that an error message that quotes it stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show(value: Any) -> str:
    """A value the user wrote, quoted, on one line and cut short, for an
    error message."""
    if isinstance(value, str):
        text = f'"{printable(value)}"'
    elif value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]  # as YAML writes them
    elif isinstance(value, int) and value.bit_length() > 200:
        text = f"a {value.bit_length()}-bit number"  # repr() refuses past 4,300 digits
    else:
        try:
            text = printable(repr(value))
        except ValueError:  # a container holding such a number
            text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def join_key(path: str, key: Any) -> str:
    """``path.key`` (the key made printable), or ``key`` at the top: where a
    message names a field of the configuration."""
    key = printable(key) if isinstance(key, str) else repr(key)
    return f"{path}.{key}" if path else key
