"""The building blocks of every config section, the core's and the
backends': the strict base model, durations, comma-separated lists, secrets
read from files. No registrar module is imported here but the errors and text, so
both the core's config and the plugin surface can build on it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, WithJsonSchema,
                      field_validator)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .text import printable, show

__all__ = ["Model", "Duration", "StrList", "Integer", "SecretFile", "parse_duration",
           "format_duration", "read_token", "show", "printable"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
#: The longest duration anything accepts: a day. Larger values (1e30 s) used
#: to pass validation and then overflow the clock at the stop.
MAX_DURATION = 86400.0
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$"


def parse_duration(value: Any) -> float:
    """``"500ms"``, ``"10s"``, ``"1m"``, ``"1h"`` -> seconds; a bare
    non-negative number is seconds; at most MAX_DURATION."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        seconds = float(min(value, MAX_DURATION * 2))  # float(10**400) would overflow
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds is None:
        raise PydanticCustomError("duration", 'expected a duration like "10s", got {got}',
                                  {"got": show(value)})
    if not seconds <= MAX_DURATION:  # also NaN and infinity
        raise PydanticCustomError("duration", "expected a duration of at most 24h, got {got}",
                                  {"got": show(value)})
    return seconds


def format_duration(seconds: float) -> str:
    if seconds == MAX_DURATION:
        return "24h"
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


#: Seconds, written in the file as "500ms", "10s", "1m".
Duration = Annotated[float, BeforeValidator(parse_duration),
                     WithJsonSchema({"anyOf": [
                         {"type": "string", "pattern": DURATION_PATTERN},
                         {"type": "number", "minimum": 0, "maximum": MAX_DURATION}],
                         "description": 'A duration: "500ms", "10s", "1m", "1h", or seconds; '
                                        'at most 24h.',
                         "examples": ["500ms", "10s", "1m"]})]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


#: A list of strings that may also be written "a,b,c" (handy with ${VAR}).
StrList = Annotated[list[str], BeforeValidator(_split_commas),
                    WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "string"}},
                                              {"type": "string"}],
                                    "description": "A list, or one comma-separated string."})]


def _no_bool(value: Any) -> Any:
    # pydantic reads true as 1: "port: true" would listen on port 1.
    if isinstance(value, bool):
        raise PydanticCustomError("integer", "expected a whole number, got {got}",
                                  {"got": show(value)})
    return value


#: A whole number; true and false are not numbers here.
Integer = Annotated[int, BeforeValidator(_no_bool)]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Model(BaseModel):
    """Base of every config section: unknown keys are errors, and no text
    value may hold a control character (a NUL or a newline in a path, an
    address or a name only ever breaks something further on)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        items = (value.values() if isinstance(value, dict) else
                 value if isinstance(value, (list, tuple)) else (value,))
        for item in items:
            if isinstance(item, str) and _CONTROL.search(item):
                raise PydanticCustomError(
                    "control_character", "no control characters (a newline, a NUL) allowed")
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and _CONTROL.search(key):
                    raise PydanticCustomError(
                        "control_character", "no control characters (a newline, a NUL) "
                        "allowed in a key")
        return value


def _readable_secret(path: str) -> str:
    try:
        read_token(path, "")
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    return path


#: A path to a file holding a secret (a token, a password), checked readable
#: and not empty at validation; the secret itself is read where it is used.
SecretFile = Annotated[str, AfterValidator(_readable_secret)]


def read_token(path: str, field: str) -> str:
    """A secret from a file, stripped; ConfigError naming the field (never
    the content) when unreadable or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {printable(path)}: {exc.strerror}") from None
    except ValueError:  # a NUL in the path; a binary file
        raise ConfigError(field, f"cannot read {show(path)}: not a path to a text file") \
            from None
    if not token:
        raise ConfigError(field, f"{printable(path)} is empty")
    return token
