"""Helpers every backend needs, exported through registrar.plugin: one way
to turn a client library's exception into one of ours with a short reason
that never carries a secret, and one TLS section."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

from .errors import MemberDown, RegistrarError, RegistryUnavailable
from .fields import Annotated, Model, Rule, doc, show

#: Causes worth a few words instead of a client library's paragraph.
KNOWN_CAUSES = (("Connection refused", "connection refused"),
                ("Name or service not known", "unknown host"),
                ("Connection reset", "connection reset"),
                ("Service Unavailable", "service unavailable"),
                ("CERTIFICATE_VERIFY_FAILED", "TLS: certificate verify failed"),
                ("SSLError", "TLS handshake failed"))

def verify_failed(text: str) -> str:
    """A CERTIFICATE_VERIFY_FAILED error as one line: what the TLS library
    said (expired, self-signed, a name mismatch), and what to fix for that
    cause, not a list of every cause there could be."""
    detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0]
    detail = " ".join(detail.split()).rstrip(" .)") if "certificate verify failed:" in text else ""
    low = detail.lower()
    if "expired" in low:
        fix = "the server's certificate has expired: renew it"
    elif "not yet valid" in low:
        fix = "the server's certificate is not valid yet: check the clocks"
    elif "mismatch" in low:
        fix = "the server's certificate does not name the host or address in the endpoint"
    elif "issuer" in low or "self-signed" in low or "self signed" in low:
        fix = ("the server's certificate is not signed by the CA in tls.ca_file "
               "(or the system's bundle)")
    else:
        fix = ("check that tls.ca_file is the CA that signed the server's certificate "
               "and that it names this host")
    return f"TLS: certificate verify failed ({detail or 'no detail'}): {fix}"


#: What a secret is replaced with in messages.
REDACTED = "<token>"


def scrub(text: object, secrets: Iterable[str | None] = (), limit: int = 200) -> str:
    """``text`` on one line, every secret in it replaced, cut to ``limit``."""
    text = " ".join(str(text).split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_reason(error: BaseException | str, secrets: Iterable[str | None] = ()) -> str:
    """A known cause in a few words, else the scrubbed text."""
    text = str(error)
    for needle, reason in KNOWN_CAUSES:
        if needle in text:
            return reason
    return scrub(text, secrets)


#: Given a client exception: the error kind and the reason to raise it
#: with, or None when the exception is not the client's to map (re-raised).
Classifier = Callable[[BaseException], "tuple[type[RegistrarError], str] | None"]


@contextlib.contextmanager
def client_errors(what: str, classify: Classifier,
                  secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Map the client exceptions raised in the block: ``what`` says what was
    being done (and where), ``classify`` picks the kind and the reason, and
    every secret is scrubbed from the message. Our own errors pass through."""
    try:
        yield
    except RegistrarError:
        raise
    except Exception as exc:  # classify decides; the rest is re-raised
        mapped = classify(exc)
        if mapped is None:
            raise
        kind, reason = mapped
        if kind is RegistryUnavailable and refused(exc):
            kind = MemberDown
        raise kind(f"{what}: {scrub(reason, secrets)}") from None


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a refused TCP connection:
    requests and urllib3 wrap ConnectionRefusedError several levels deep,
    sometimes only in the text."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen or not isinstance(item, BaseException):
            continue
        seen.add(id(item))
        if isinstance(item, ConnectionRefusedError) or "Connection refused" in str(item):
            return True
        todo.extend([item.__cause__, item.__context__, *item.args])
    return False


def _readable(path: str) -> str:
    try:
        readable = os.path.isfile(path) and os.access(path, os.R_OK)
    except ValueError:  # a NUL in the path
        readable = False
    if not readable:
        why = "no such file" if "\0" not in path and not os.path.exists(path) else \
            "not a readable file"
        raise ValueError(f"cannot read {show(path)}: {why}")
    return path


#: A path to a file that must be readable.
ReadableFile = Annotated[str, Rule(_readable)]


class TLSConfig(Model):
    """TLS to the registry: the same keys for every backend."""
    ca_file: Annotated[ReadableFile | None, doc(
        "CA bundle (PEM) that signed the servers' certificates.")] = None
    cert_file: Annotated[ReadableFile | None, doc(
        "Client certificate (PEM), for mutual TLS.")] = None
    key_file: Annotated[ReadableFile | None, doc(
        "Key of cert_file (if not in cert_file itself).")] = None
    verify: Annotated[bool, doc("Verify the servers' certificates.")] = True

    def check(self) -> None:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
