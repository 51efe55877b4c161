"""The building blocks of every config section, the core's and the
backends': the strict base model, durations, comma-separated lists, secrets
read from files, and the one place a validation error becomes a line naming
the field. No registrar module is imported here but the errors and text, so
both the core's config and the plugin surface can build on it.

The models are msgspec Structs (about 3 MB in the agent, where pydantic
took 14): msgspec checks the types, the bounds of numbers (``Meta(ge=...)``)
and the unknown keys; what it cannot express is a *rule* in the field's
``Annotated[...]`` (``Rule(func)``: a function of the converted value that
returns the value to keep or raises ValueError), and what spans fields is a
model's ``check()``. Both run in ``__post_init__``, so a section built in
code (``StopConfig(grace_period=10)``) is checked like one read from a file.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from .errors import ConfigError
from .text import join_key, printable, show

__all__ = [
    "MAX_DURATION",
    "Annotated",
    "Duration",
    "Meta",
    "Model",
    "Rule",
    "Secret",
    "SecretFile",
    "SecretText",
    "StrList",
    "at_least",
    "doc",
    "dump",
    "field",
    "format_duration",
    "more_than",
    "non_empty",
    "parse",
    "parse_duration",
    "printable",
    "read_token",
    "show",
]

#: msgspec's field(default_factory=...), for defaults that are mutable.
field = msgspec.field

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*$")  # ASCII digits: not "١٠s"
#: The longest duration anything accepts: a day. Larger values (1e30 s) used
#: to pass validation and then overflow the clock at the stop.
MAX_DURATION = 86400.0
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$"


def doc(text: str, **schema: Any) -> Meta:
    """A field's description (and any more JSON Schema keywords)."""
    return Meta(description=text, **schema)


class Rule:
    """``Annotated`` metadata: ``func(value)`` runs on the converted value
    (never on None, "not given"); it returns the value to keep, or raises
    ValueError with a message that says what it got."""

    def __init__(self, func: Callable[[Any], Any]):
        self.func = func

    def __repr__(self) -> str:
        return f"Rule({self.func.__name__})"


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
        raise ValueError(f'expected a duration like "10s", got {show(value)}')
    if not seconds <= MAX_DURATION:  # also NaN and infinity
        raise ValueError(f"expected a duration of at most 24h, got {show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds == MAX_DURATION:
        return "24h"
    # At most three decimals: a third of 10 s is "3.333s", not "3.33333s".
    if seconds and seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    return f"{round(seconds, 3):g}s"


class _Bound(Rule):
    """A duration's lower bound (the upper one is always 24h)."""

    def __init__(self, least: float, strict: bool):
        self.least, self.strict = least, strict
        super().__init__(self._check)

    def _check(self, seconds: float) -> float:
        if seconds < self.least or (self.strict and seconds == self.least):
            words = _between(("gt" if self.strict else "ge", self.least), ("le", MAX_DURATION),
                             format_duration)
            raise ValueError(f"should be {words}, got {format_duration(seconds)}")
        return seconds


def at_least(seconds: float) -> Rule:
    """Annotated metadata for a Duration: at least ``seconds``."""
    return _Bound(seconds, strict=False)


def more_than(seconds: float) -> Rule:
    """Annotated metadata for a Duration: more than ``seconds``."""
    return _Bound(seconds, strict=True)


#: Seconds, written in the file as "500ms", "10s", "1m" (or a number).
Duration = Annotated[Any, Meta(extra_json_schema={
    "anyOf": [{"type": "string", "pattern": DURATION_PATTERN},
              {"type": "number", "minimum": 0, "maximum": MAX_DURATION}],
    "description": 'A duration: "500ms", "10s", "1m", "1h", or seconds; at most 24h.',
    "examples": ["500ms", "10s", "1m"]}), Rule(parse_duration)]


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError(f"expected a list of text, or one comma-separated text, got {show(value)}")


#: A list of strings that may also be written "a,b,c" (handy with ${VAR}).
StrList = Annotated[Any, Meta(extra_json_schema={
    "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
    "description": "A list, or one comma-separated string."}), Rule(_str_list)]


def non_empty(value: list) -> list:
    """A Rule for a StrList that needs at least one item."""
    if not value:
        raise ValueError("should have at least 1 item")
    return value


class Secret:
    """A secret given in the configuration itself: its repr and str never
    show it; ``get_secret_value()`` does."""
    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ValueError("expected text (the value is not shown)")
    return Secret(value)


#: A secret written in the file (prefer SecretFile); held as a Secret.
SecretText = Annotated[Any, Meta(extra_json_schema={"type": "string"}), Rule(_secret)]


def _readable_secret(path: str) -> str:
    try:
        read_token(path, "")
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    return path


#: A path to a file holding a secret (a token, a password), checked readable
#: and not empty at validation; the secret itself is read where it is used.
SecretFile = Annotated[str, Rule(_readable_secret)]


#: Set by secrets_unread(): read_token() reads nothing.
_SECRETS_UNREAD: contextvars.ContextVar[bool] = contextvars.ContextVar("secrets_unread",
                                                                       default=False)
#: What read_token() returns under secrets_unread().
UNREAD_SECRET = "<not read>"


@contextlib.contextmanager
def secrets_unread() -> Iterator[None]:
    """Validate without reading secret files (`registrar check --offline`,
    where the Secrets are not mounted): read_token() returns UNREAD_SECRET."""
    token = _SECRETS_UNREAD.set(True)
    try:
        yield
    finally:
        _SECRETS_UNREAD.reset(token)


def read_token(path: str, field: str) -> str:
    """A secret from a file, stripped; ConfigError naming the field (never
    the content) when unreadable or empty."""
    from .files import SECRET_BYTES, NotRegular, TooLarge, read_regular

    if _SECRETS_UNREAD.get():
        return UNREAD_SECRET

    try:
        token = read_regular(path, SECRET_BYTES).decode().strip()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {printable(path)}: {exc.strerror}") from None
    except (NotRegular, TooLarge) as exc:
        raise ConfigError(field, f"cannot read {show(path)}: {exc}") from None
    except ValueError:  # a NUL in the path; a binary file
        raise ConfigError(field, f"cannot read {show(path)}: not a path to a text file") \
            from None
    if not token:
        raise ConfigError(field, f"{printable(path)} is empty")
    return token


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NO_CONTROL = "no control characters (a newline, a NUL) allowed"


def _no_control(value: Any) -> None:
    items = (value.values() if isinstance(value, dict) else
             value if isinstance(value, (list, tuple)) else (value,))
    for item in items:
        if isinstance(item, str) and _CONTROL.search(item):
            raise ValueError(_NO_CONTROL)
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and _CONTROL.search(key):
                raise ValueError(_NO_CONTROL + " in a key")


class Model(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of every config section: unknown keys are errors, no text value
    may hold a control character (a NUL or a newline in a path, an address
    or a name only ever breaks something further on), each field's Rules
    run, then ``check()``."""

    def __post_init__(self) -> None:
        optional = _optional(type(self))
        for name, rules in _rules(type(self)).items():
            value = getattr(self, name)
            try:
                _no_control(value)
                if value is None and name in optional:
                    continue  # "not given"; a field that is not Optional gets its rules
                for rule in rules:
                    value = rule.func(value)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{name}: {exc}") from None
            if value is not getattr(self, name):
                msgspec.structs.force_setattr(self, name, value)
        self.check()

    def check(self) -> None:
        """Checks that span fields: raise ValueError("<field>: <what is
        wrong>") to name one of this section's fields, or a message without
        a field name for the section as a whole."""

    @classmethod
    def parse(cls, data: Any, path: str = "") -> Any:
        """``data`` (a mapping read from a file) validated as this section;
        ConfigError naming the field (prefixed with ``path``) otherwise."""
        return parse(cls, data, path)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _metadata(hint: Any) -> list[Any]:
    """Every Annotated metadata item in ``hint``, through unions, innermost
    first."""
    found: list[Any] = []
    if typing.get_origin(hint) is Annotated:  # the inner type's first: its Rules parse
        found.extend(_metadata(typing.get_args(hint)[0]))
        found.extend(hint.__metadata__)
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            found.extend(_metadata(arg))
    return found


@functools.cache
def _rules(cls: type) -> dict[str, list[Rule]]:
    return {name: [m for m in _metadata(hint) if isinstance(m, Rule)]
            for name, hint in _hints(cls).items() if name in cls.__struct_fields__}


def _optional(cls: type) -> set[str]:
    """The fields whose type admits None (a StrList, which is Any to msgspec,
    does only when written ``StrList | None``)."""
    return {name for name, hint in _hints(cls).items()
            if type(None) in typing.get_args(typing.get_args(hint)[0]
                                              if typing.get_origin(hint) is Annotated else hint)}


def _models_in(hint: Any) -> list[type[Model]]:
    """The Model classes a field's type may hold (through Optional, list...)."""
    if isinstance(hint, type) and issubclass(hint, Model):
        return [hint]
    return [m for arg in typing.get_args(hint) for m in _models_in(arg)]


# -- a validation error, as one line naming the field ---------------------------------------

def parse(model: type, data: Any, path: str = "") -> Any:
    """``data`` validated as ``model``: the model, or ConfigError naming the
    field (its path prefixed with ``path``) in words a user can act on."""
    try:
        return msgspec.convert(data, model, strict=False)
    except msgspec.ValidationError as exc:
        raise _config_error(str(exc), model, path, data) from None


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")
_SECRET = re.compile(r"token|password|secret|key", re.IGNORECASE)
_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
          "array": "a list", "object": "a mapping", "null": "null"}


def _config_error(text: str, model: type, prefix: str, data: Any) -> ConfigError:
    m = _AT.match(text)
    message, at = m.group("message"), m.group("at") or ""
    loc: list[Any] = []
    in_values = False  # the error is in one of a mapping's values (msgspec names no key)
    for step in _STEP.finditer(at):
        if step.group(0) == "[...]":
            in_values = True
            break
        loc.append(step.group(1) if step.group(1) else int(step.group(2)))

    def path(parts: list[Any]) -> str:
        out = prefix
        for part in parts:
            out = f"{out}[{part}]" if isinstance(part, int) else join_key(out, part)
        return out

    known = re.match(r"Object (missing required|contains unknown) field `(.+)`$", message,
                     re.DOTALL)
    if known:
        loc.append(known.group(2))
        if known.group(1) == "missing required":
            return ConfigError(path(loc), "required")
        return ConfigError(path(loc), "unknown key" + _did_you_mean(model, loc))
    if not message.startswith(("Expected `", "Invalid enum value", "Integer value out of")):
        # Ours: "<field>: <message>" from a Rule or check(), else the section's.
        name, sep, rest = message.partition(": ")
        if sep and name in _fields_at(model, loc):
            return ConfigError(path([*loc, name]), rest)
        return ConfigError(path(loc), message)
    hint = _hint_at(model, loc)
    given = _lookup(data, loc)
    secret = bool(loc) and bool(_SECRET.search(str(loc[-1])))
    got = "" if secret else f", got {show(given)}"
    bound = re.match(r"Expected `(\w+)` (?:of length )?([<>]=?) (\d+)?", message)
    if message.startswith("Integer value out of"):
        words = f"should be {_range(hint) or 'smaller'}"
    elif bound and bound.group(1) in ("array", "object") and "length" in message:
        if bound.group(2) == ">=":
            words = "should have at least 1 item"
        else:  # the list itself would be a wall of text: its length says enough
            words, got = f"has too many items (at most {bound.group(3)})", \
                f", got {len(given)}" if isinstance(given, (list, dict)) else got
    elif bound and "length" in message:
        words = "should not be empty" if bound.group(2) == ">=" else "is too long"
    elif bound:
        words = f"should be {_range(hint)}"
    elif "matching regex" in message:
        pattern = message.split("matching regex ", 1)[1]
        words = f"should match the pattern {pattern}"
    elif message.startswith("Invalid enum value") or (_models_in(hint) and _literals(hint)):
        choices = [show(c) for c in _literals(hint)]
        if _models_in(hint):  # a section that may also be given as one of these
            words = "expected a mapping or " + " or ".join(choices)
        else:
            words = "expected one of " + ", ".join(choices)
    else:
        wanted = re.match(r"Expected `([^`]*)`", message)
        kinds = [_WORDS.get(k.strip(), k.strip()) for k in wanted.group(1).split("|")] \
            if wanted else ["something else"]
        kinds = [k for k in kinds if k != "null"] or ["null"]
        words = "expected " + " or ".join(kinds)
        if in_values:
            words = f"expected {' or '.join(kinds)} as every value"
    return ConfigError(path(loc), f"{words}{got}")


def _literals(hint: Any) -> list[Any]:
    """The values a Literal in ``hint`` allows (through Annotated and unions)."""
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    if typing.get_origin(hint) is Annotated:
        return _literals(typing.get_args(hint)[0])
    return [v for arg in typing.get_args(hint) for v in _literals(arg)]


_BOUND_WORDS = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}


def _between(low: tuple[str, Any] | None, high: tuple[str, Any] | None,
             say: Callable[[Any], str] = str) -> str:
    """A range in words ("from 1 to 65535", "more than 0s and at most 24h")
    from its bounds, each (``ge``/``gt``/``le``/``lt``, value) or None."""
    if low and high and low[0] == "ge" and high[0] == "le":
        return f"from {say(low[1])} to {say(high[1])}"
    return " and ".join(f"{_BOUND_WORDS[key]} {say(value)}"
                        for key, value in (b for b in (low, high) if b)) or "in range"


def _range(hint: Any) -> str:
    """A number field's whole range in words, from its Meta bounds."""
    low = high = None
    for meta in _metadata(hint):
        if isinstance(meta, Meta):
            for key in ("ge", "gt"):
                if getattr(meta, key, None) is not None:
                    low = (key, getattr(meta, key))
            for key in ("le", "lt"):
                if getattr(meta, key, None) is not None:
                    high = (key, getattr(meta, key))
    return _between(low, high)


def _hint_at(model: type, loc: list[Any]) -> Any:
    """The type hint of the field at ``loc`` in ``model`` (None if unknown)."""
    hint: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        models = _models_in(hint)
        if not models or part not in _hints(models[0]):
            return None
        hint = _hints(models[0])[part]
    return hint


def _fields_at(model: type, loc: list[Any]) -> tuple[str, ...]:
    models = _models_in(_hint_at(model, loc))
    return models[0].__struct_fields__ if models else ()


def _lookup(data: Any, loc: list[Any]) -> Any:
    """The value at ``loc`` as the user wrote it (before conversion)."""
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _did_you_mean(model: type, loc: list[Any]) -> str:
    fields = list(_fields_at(model, loc[:-1]))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"


def dump(model: Model) -> dict[str, Any]:
    """A section as plain data, durations as the file writes them ("10s",
    "500ms"), secrets redacted: what `registrar check --effective` prints."""
    return _redact(_durations_as_text(model, msgspec.to_builtins(model, enc_hook=_encode)))


def _durations_as_text(model: Any, data: Any) -> Any:
    if not isinstance(model, msgspec.Struct) or not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(type(model), include_extras=True)
    for name in list(data):
        value = getattr(model, name, None)
        if isinstance(value, msgspec.Struct):
            data[name] = _durations_as_text(value, data[name])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and _is_duration(hints.get(name)):
            data[name] = format_duration(value)
    return data


def _is_duration(hint: Any) -> bool:
    """Whether a field's annotation is a Duration (also inside ``| None``)."""
    if any(isinstance(m, Rule) and m.func is parse_duration
           for m in getattr(hint, "__metadata__", ())):
        return True
    return any(_is_duration(arg) for arg in typing.get_args(hint))


def _encode(value: Any) -> Any:
    if isinstance(value, Secret):
        return "<redacted>"
    raise NotImplementedError(type(value).__name__)


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: ("<redacted>" if v is not None and _SECRET.search(k)
                    and not k.endswith("_file") else _redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def refuse_credentials(url: str, instead: str) -> None:
    """ValueError if ``url`` holds a user name or password (``user:pw@host``):
    a URL is shown in /status, the report file, `registrar check` and logs,
    where a secret must never go. ``instead`` says where it belongs. The
    message shows the URL with its credentials replaced."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        userinfo = "@" in parts.netloc
    except ValueError:
        return  # not a URL: the caller's own check says so
    if userinfo:
        hidden = url.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1], 1)
        raise ValueError(f"credentials in a URL are refused ({show(hidden)}): they would "
                         f"show wherever the URL does; {instead}")
