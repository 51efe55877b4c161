"""The HTTPS server of `registrar webhook`: the standard library's
ThreadingHTTPServer (HTTP/1.1, keep-alive: the API server reuses its
connections), with what a server that anything in the cluster can reach
needs:

- TLS is set up per connection, in that connection's thread (a slow
  handshake never holds up the accept loop), with the certificate files as
  they are at that moment: a rotated certificate is served from the next
  connection on, and a broken one is reported while the last good one stays;
- deadlines: the handshake, and then each request (line, headers, body,
  answer), within ``request_timeout``; an idle keep-alive connection is
  closed after IDLE_TIMEOUT. A socket timeout bounds each read only (a
  client sending a byte a second never trips it), so a watchdog thread cuts
  the socket of a connection past its deadline;
- at most MAX_CONNECTIONS at once (a thread each): past it, a new connection
  evicts the one idle longest, else the one longest in its handshake or
  request; when every one is being answered, the new one is closed;
- bodies with a Content-Length of at most MAX_BODY only: a larger one is
  answered 413 before a byte of it is read, and the connection closed.

Logging follows the control server's: one line per review, refusals (bad
requests, failed handshakes, a full server) the first time and then at most
once a minute with a count; never a header or a body.

The certificates are here too: CertificateFiles (the files, reloaded) and
self_signed() (--self-signed: a CA and a serving certificate, made with the
cryptography package).
"""
from __future__ import annotations

import _socket
import base64
import json
import logging
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .logs import Quiet
from .signals import STOP_SIGNALS, SignalPipe
from .text import printable
from .admission import API_VERSION, MAX_BODY, Answer, Webhook

log = logging.getLogger("registrar.webhook")

#: Seconds for the TLS handshake, and for each request from its first line
#: to the end of its answer.
REQUEST_TIMEOUT = 10.0
#: Seconds a keep-alive connection may wait for its next request. Less than
#: the API server's own idle timeout (90 s) would make it retry more often;
#: Go retries a request whose reused connection was closed under it.
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 128
#: After SIGTERM: keep serving this long, /readyz failing, while the
#: endpoints controller and the API server learn that this pod is going.
SHUTDOWN_DELAY = 5.0
#: Then requests already in progress get this long to be answered.
SHUTDOWN_GRACE = 2.0
#: After an error answer with the request unread, how long to read and drop
#: what the client still sends (closing with unread data would reset the
#: connection, and could destroy the answer before the client read it).
LINGER = 1.0
WATCH_INTERVAL = 0.1
#: Warn when the certificate ends within this many days.
EXPIRY_WARNING_DAYS = 30


class CertificateFiles:
    """The serving certificate and its key, read again whenever either file
    changes (a stat of each at every new connection: cert-manager's Secret,
    mounted, changes through the kubelet's atomic symlink swap)."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self._context = self._load()  # ValueError (one line): the command exits 2
        log.info("webhook: serving %s", self._describe())

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: the files as they are now, or,
        when they do not load, the last ones that did."""
        with self._lock:
            stamp = self._files_stamp()
            if stamp != self._stamp:
                self._stamp = stamp  # tried once per change: no warning per connection
                try:
                    self._context = self._load()
                except ValueError as exc:
                    log.warning("webhook: %s; still serving the previous certificate", exc)
                else:
                    log.info("webhook: certificate reloaded: serving %s", self._describe())
            return self._context

    def _files_stamp(self) -> tuple:
        stamp = []
        for path in (self.cert_file, self.key_file):
            try:
                st = os.stat(path)
                stamp.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError as exc:
                stamp.append(exc.errno)
        return tuple(stamp)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except OSError as exc:  # ssl.SSLError is one
            why = getattr(exc, "reason", None) or exc.strerror or str(exc)
            raise ValueError(f"cannot load the certificate {self.cert_file} with the key "
                             f"{self.key_file}: {printable(str(why))}") from None
        return context

    def _describe(self) -> str:
        """The certificate's names and end (a warning when it is near)."""
        try:
            import datetime

            from cryptography import x509

            with open(self.cert_file, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (ImportError, OSError, ValueError):
            return self.cert_file
        try:
            names = [str(n.value) for n in cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value]
        except x509.ExtensionNotFound:
            names = []
        end = cert.not_valid_after_utc
        left = end - datetime.datetime.now(datetime.UTC)
        if left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            log.warning("webhook: the certificate %s %s %s", self.cert_file,
                        "expired on" if left.total_seconds() < 0 else "expires on",
                        end.isoformat(timespec="seconds"))
        return (f"{self.cert_file} (for {', '.join(names) or 'no DNS name'}, valid until "
                f"{end.isoformat(timespec='seconds')})")


# -- --self-signed ---------------------------------------------------------------

#: Validity of what --self-signed makes. Long, on purpose: the CA is pinned in
#: the MutatingWebhookConfiguration's caBundle, and an expired serving
#: certificate makes every call fail (with failurePolicy Ignore, pods then go
#: uninjected without a word). Running the command again re-issues a serving
#: certificate that is near its end, keeping the CA (so the caBundle).
CA_DAYS = 3650
SERVING_DAYS = 3650
RENEW_BEFORE_DAYS = 30


@dataclass(frozen=True)
class SelfSigned:
    """What --self-signed left in its directory."""
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca_pem: bytes
    issued: bool  # False: the files already there were still good and are kept

    @property
    def ca_bundle(self) -> str:
        """The MutatingWebhookConfiguration's caBundle: base64 of the CA's PEM."""
        return base64.b64encode(self.ca_pem).decode()


def service_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for the webhook's Service."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def self_signed(directory: str | Path, service: str, namespace: str,
                extra: list[str] = (), now: Any = None) -> SelfSigned:
    """A CA (ca.crt, ca.key) and a serving certificate signed by it
    (tls.crt, tls.key) for the Service ``service`` in ``namespace`` (and
    ``extra`` DNS names or IP addresses) in ``directory``. Idempotent: a CA
    that is still good is kept, and so is a serving certificate that covers
    the names and is not near its end. Keys are written 0600, every file
    by rename (a server reading them sees the old file or the new one)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")}
    now = now or datetime.datetime.now(datetime.UTC)
    renew = now + datetime.timedelta(days=RENEW_BEFORE_DAYS)
    names = service_names(service, namespace) + [n for n in extra
                                                 if n not in service_names(service, namespace)]
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))

    def load(cert_name: str, key_name: str):
        try:
            cert = x509.load_pem_x509_certificate(paths[cert_name].read_bytes())
            key = serialization.load_pem_private_key(paths[key_name].read_bytes(), None)
        except (OSError, ValueError, TypeError):
            return None, None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            return None, None
        return cert, key

    ca_cert, ca_key = load("ca.crt", "ca.key")
    if ca_cert is not None and ca_cert.not_valid_after_utc <= renew:
        ca_cert = None
    issued = False
    if ca_cert is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                f"registrar webhook CA ({namespace}/{service})")])
        ca_cert = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(subject)
                   .public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=False, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                       key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
        _write(paths["ca.key"], ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600)
        _write(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        issued = True

    leaf, _ = load("tls.crt", "tls.key")
    good = (not issued and leaf is not None and leaf.issuer == ca_cert.subject
            and leaf.not_valid_after_utc > renew and _signed_by(leaf, ca_cert)
            and set(_sans(leaf)) >= set(sans))
    if not good:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(min(now + datetime.timedelta(days=SERVING_DAYS),
                                     ca_cert.not_valid_after_utc))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=False, crl_sign=False,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(paths["tls.key"], key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600)
        _write(paths["tls.crt"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
        issued = True
    return SelfSigned(paths["ca.crt"], paths["tls.crt"], paths["tls.key"],
                      ca_cert.public_bytes(serialization.Encoding.PEM), issued)


def _sans(cert: Any) -> list[Any]:
    from cryptography import x509

    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _signed_by(cert: Any, ca: Any) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:  # noqa: BLE001 - InvalidSignature, or a key type it cannot check
        return False


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)



@dataclass(eq=False)
class _Conn:
    key: int  # id() of the accepted socket, socketserver's handle on the connection
    sock: socket.socket  # what owns the file descriptor now (the raw socket, then the TLS one)
    state: str  # handshake, idle, reading, answering
    since: float
    deadline: float
    gone: bool = False  # cut (evicted, overdue): whatever its thread does next fails


class _Connections:
    """The open connections and their deadlines."""

    #: Who makes room for a new connection, first to last.
    _EVICTABLE = ("idle", "handshake", "reading")

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[int, _Conn] = {}  # id(raw socket) -> connection

    def __len__(self) -> int:
        return len(self._open)

    def open(self, raw: socket.socket, seconds: float) -> _Conn | None:
        now = time.monotonic()
        with self._lock:
            if len(self._open) >= self.limit:
                for state in self._EVICTABLE:
                    waiting = [c for c in self._open.values() if c.state == state]
                    if waiting:
                        victim = min(waiting, key=lambda c: c.since)
                        self._remove(victim)
                        _cut(victim.sock)
                        break
                else:
                    return None
            conn = _Conn(id(raw), raw, "handshake", now, now + seconds)
            self._open[conn.key] = conn
            return conn

    def find(self, raw: socket.socket) -> _Conn | None:
        with self._lock:
            return self._open.get(id(raw))

    def arm(self, conn: _Conn, state: str, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            if conn.gone:  # cut while its socket was changing hands: cut the new one too
                _cut(conn.sock)
                return
            if conn.state != state:
                conn.state, conn.since = state, now
            conn.deadline = now + seconds

    def closed(self, conn: _Conn) -> None:
        with self._lock:
            if self._open.get(conn.key) is conn:
                del self._open[conn.key]

    def cut_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            for conn in [c for c in self._open.values() if c.deadline <= now]:
                self._remove(conn)
                log.debug("webhook: closing a connection past its deadline (%s)", conn.state)
                _cut(conn.sock)

    def busy(self) -> bool:
        with self._lock:
            return any(c.state in ("reading", "answering") for c in self._open.values())

    def cut_all(self) -> None:
        with self._lock:
            for conn in list(self._open.values()):
                self._remove(conn)
                _cut(conn.sock)

    def _remove(self, conn: _Conn) -> None:
        conn.gone = True
        if self._open.get(conn.key) is conn:
            del self._open[conn.key]


def _cut(sock: socket.socket) -> None:
    """Shut the connection down under the thread that reads it (its read
    returns at once). The plain socket's shutdown, from the C level: an
    SSLSocket's own would drop its TLS state under the other thread."""
    try:
        _socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed already, or never connected


class WebhookServer(ThreadingHTTPServer):
    """Serves one Webhook over HTTPS at ``where`` (host, port); listens from
    construction (a busy port fails there)."""

    daemon_threads = True  # a stuck connection must not hold the exit
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, where: tuple[str, int], certs: CertificateFiles, webhook: Webhook, *,
                 request_timeout: float = REQUEST_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 shutdown_delay: float = SHUTDOWN_DELAY, max_connections: int = MAX_CONNECTIONS):
        self.address_family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
        self.certs = certs
        self.webhook = webhook
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.shutdown_delay = shutdown_delay
        self.connections = _Connections(max_connections)
        self.quiet = Quiet(log)
        self.stopping = False
        self._closed = False
        super().__init__(where, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's would look the host's name up (socket.getfqdn): a DNS
        # query that can stall the start for seconds, for a name never used.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; then fail /readyz, keep serving for
        shutdown_delay (a second signal ends it), and exit once requests in
        progress are answered (SHUTDOWN_GRACE at most)."""
        pipe = SignalPipe().catch(STOP_SIGNALS)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                         name="webhook-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="webhook-deadlines", daemon=True).start()
        log.info("webhook: serving AdmissionReview %s on https://%s/mutate", API_VERSION,
                 self.address)
        try:
            caught: list[int] = []
            while not caught:
                caught = pipe.wait()
            self.stopping = True
            log.info("webhook: %s: /readyz fails from now on; serving %gs more",
                     signal.Signals(caught[0]).name, self.shutdown_delay)
            end = time.monotonic() + self.shutdown_delay
            while (left := end - time.monotonic()) > 0:
                if pipe.wait(left):
                    break  # asked again: go now
            self.shutdown()
            end = time.monotonic() + SHUTDOWN_GRACE
            while self.connections.busy() and time.monotonic() < end:
                time.sleep(0.02)
        finally:
            self._closed = True
            self.connections.cut_all()
            self.server_close()
            pipe.close()
        log.info("webhook: stopped")
        return 0

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCH_INTERVAL)
            self.connections.cut_overdue()

    # -- socketserver's steps, per connection ---------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.connections.open(request, self.request_timeout) is None:
            self.quiet.warn("full", f"webhook: {len(self.connections)} connections are being "
                                    f"answered: closing a new one")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)  # a thread that runs finish_request

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = self.connections.find(request)
        if conn is None:
            return  # evicted before its thread ran
        try:
            request.settimeout(self.request_timeout)
            tls = self.certs.context().wrap_socket(request, server_side=True,
                                                   do_handshake_on_connect=False)
        except OSError:
            return
        conn.sock = tls  # the raw socket is detached now: TLS owns the descriptor
        try:
            try:
                self.connections.arm(conn, "handshake", self.request_timeout)  # cut meanwhile?
                tls.do_handshake()
            except ssl.SSLError as exc:
                return self._handshake_failed(client_address, exc)
            except OSError:
                return  # gone, cut, or timed out: nothing worth a line
            _Handler(tls, client_address, self, conn)  # its errors: handle_error()
        finally:
            tls.close()

    def shutdown_request(self, request: Any) -> None:
        conn = self.connections.find(request)
        if conn is not None:
            self.connections.closed(conn)
        try:
            request.close()  # the TLS socket, if any, was closed by finish_request
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away, or its deadline cut it
            log.debug("webhook: connection from %s: %s", _peer(client_address), exc)
        else:
            log.error("webhook: connection from %s failed", _peer(client_address),
                      exc_info=exc)  # socketserver calls this from its except block

    def _handshake_failed(self, client_address: Any, exc: ssl.SSLError) -> None:
        reason = exc.reason or str(exc)
        hint = ""
        if any(alert in reason for alert in ("UNKNOWN_CA", "BAD_CERTIFICATE",
                                             "CERTIFICATE_UNKNOWN")):
            hint = (" (the client does not trust this certificate: is the "
                    "MutatingWebhookConfiguration's caBundle the CA that signed it, and is "
                    "the Service's name in it?)")
        # Rate-limited per reason: a client that does not trust us must not be
        # hidden behind the handshakes that others let time out.
        self.quiet.warn(f"tls {reason}", f"webhook: TLS handshake with "
                                         f"{_peer(client_address)} failed: "
                                         f"{printable(reason)}{hint}")


def _peer(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else "?"


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests: POST /mutate, GET /healthz, GET /readyz."""

    protocol_version = "HTTP/1.1"
    server_version = "registrar-webhook"
    sys_version = ""
    disable_nagle_algorithm = True  # the head and the body go out as two writes
    server: WebhookServer

    def __init__(self, request: Any, client_address: Any, server: WebhookServer, conn: _Conn):
        self.conn = conn
        self.served = 0
        super().__init__(request, client_address, server)

    # -- deadlines --------------------------------------------------------------------

    def _arm(self, state: str, seconds: float) -> None:
        self.server.connections.arm(self.conn, state, seconds)
        self.connection.settimeout(seconds)

    def handle_one_request(self) -> None:
        # The first request comes at once; later ones may wait (keep-alive).
        self._arm("idle", self.server.idle_timeout if self.served else self.server.request_timeout)
        self.served += 1
        self.headers = None  # the previous request's are not this one's
        super().handle_one_request()

    def parse_request(self) -> bool:
        self._arm("reading", self.server.request_timeout)  # the line is in: the rest is due
        return super().parse_request()

    # -- the endpoints ------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if self._has_body():  # never read: it would be taken for the next request
            self._refuse(HTTPStatus.BAD_REQUEST, "a GET with a body")
        elif path == "/healthz":
            self._send(HTTPStatus.OK, {"status": "alive"})
        elif path == "/readyz":
            ready = not self.server.stopping
            self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                       {"ready": ready})
        elif path == "/mutate":
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "GET not allowed on /mutate: POST an "
                                                        "AdmissionReview", {"Allow": "POST"})
        else:
            self._refuse(HTTPStatus.NOT_FOUND, f"no such endpoint: {printable(path)}")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path != "/mutate":
            if path in ("/healthz", "/readyz"):
                return self._refuse(HTTPStatus.METHOD_NOT_ALLOWED,
                                    f"POST not allowed on {path}", {"Allow": "GET"})
            return self._refuse(HTTPStatus.NOT_FOUND, f"no such endpoint: {printable(path)}")
        length = self._content_length()
        if length is None:
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return self._refuse(HTTPStatus.REQUEST_TIMEOUT, "the request body took too long")
        if len(body) < length:
            self.close_connection = True  # gone, or cut by its deadline
            return
        self._arm("answering", self.server.request_timeout)
        answer: Answer = self.server.webhook.review(body, self.headers.get("Content-Type"))
        if answer.bad:
            self.server.quiet.warn("bad", f"webhook: bad request from {_peer(self.client_address)}"
                                          f"{answer.summary}")
        else:
            log.log(answer.level, "webhook: %s", answer.summary)
        self._send(answer.status, answer.body)

    def handle_expect_100(self) -> bool:
        # A body refused (too large, no length) is refused before it is sent.
        if self._content_length() is None:
            return False
        return super().handle_expect_100()

    # -- the body --------------------------------------------------------------------------

    def _has_body(self) -> bool:
        """Whether the request may have more bytes than were read (unknown
        before its headers are)."""
        if self.headers is None:
            return True
        return ("Transfer-Encoding" in self.headers
                or self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def _content_length(self) -> int | None:
        """The body's length, or None when the request was refused (and
        answered) for it."""
        refusal = None
        values = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers:
            refusal = (HTTPStatus.LENGTH_REQUIRED,
                       "Transfer-Encoding is not supported: send Content-Length")
        elif not values:
            refusal = HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"
        elif len({v.strip() for v in values}) != 1 or not (
                values[0].strip().isascii() and values[0].strip().isdigit()):
            refusal = HTTPStatus.BAD_REQUEST, "malformed Content-Length"
        elif int(values[0]) > MAX_BODY:
            refusal = (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"a body of at most {MAX_BODY} bytes (the API server's own limit), "
                       f"got {int(values[0])}")
        if refusal is None:
            return int(values[0])
        self._refuse(*refusal)
        return None

    # -- answers ---------------------------------------------------------------------------

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header,
        one too long, an unknown method), as JSON."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        if self.request_version == "HTTP/0.9":  # a garbled request line: answer in HTTP/1.1
            self.request_version = self.protocol_version
        self._refuse(code, printable(message or phrase))

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """An error answer, then the close: whatever the request still
        holds is not read (and is dropped for a moment: see LINGER)."""
        self.server.quiet.warn("bad", f"webhook: bad request from {_peer(self.client_address)}: "
                                      f"{message} ({int(status)})")
        unread = self._has_body()
        self._send(status, {"error": message}, headers, close=True)
        if unread:
            self._linger()

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
              close: bool = False) -> None:
        data = json.dumps(body).encode()
        self._arm("answering", self.server.request_timeout)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close or self.close_connection:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)

    def _linger(self) -> None:
        end = time.monotonic() + LINGER
        try:
            while (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    break
        except (OSError, ValueError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # http.server's parameter name
        # The request line and status only (never a header): debug.
        log.debug("webhook: %s %s", _peer(self.client_address), printable(format % args))
