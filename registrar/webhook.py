"""`registrar webhook`: `registrar inject`'s transformation served as a
Kubernetes mutating admission webhook, AdmissionReview v1 over HTTPS.

This module is the command alone, and light to import: the cli builds its
parser from it on every run, `registrar prestop` included. What a review
gets is in ``admission``; the HTTPS server, the certificate files and
--self-signed in ``_webhook_server``; jsonpatch and cryptography (the
``webhook`` extra) come with them.
"""
from __future__ import annotations

import argparse
from typing import Any

DEFAULT_LISTEN = "0.0.0.0:8443"
DEFAULT_CERT_DIR = "/etc/registrar-webhook/certs"


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``webhook`` command on the cli's subparsers."""
    p = sub.add_parser(
        "webhook", parents=parents,
        help="serve `registrar inject` as a Kubernetes mutating admission webhook",
        description="Serve the injection of `registrar inject` as a mutating admission "
                    "webhook: AdmissionReview v1 on POST /mutate over HTTPS, JSONPatch answers; "
                    "GET /healthz and /readyz for probes. The certificate files are read again "
                    "when they change (cert-manager rotates them). With --self-signed it makes "
                    "a CA and a certificate for the Service itself and prints the caBundle for "
                    "the MutatingWebhookConfiguration on standard output (one line). Needs the "
                    "webhook extra: pip install 'registrar[webhook]'.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve HTTPS (default: {DEFAULT_LISTEN})")
    p.add_argument("--cert-file", default=None, metavar="FILE",
                   help=f"serving certificate, PEM, with its chain (default: "
                        f"{DEFAULT_CERT_DIR}/tls.crt; with --self-signed: tls.crt in --cert-dir)")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help=f"its private key, PEM (default: {DEFAULT_CERT_DIR}/tls.key)")
    p.add_argument("--image", default=None,
                   help="the registrar image the injected containers run (default: the "
                        "injection's own)")
    p.add_argument("--self-signed", action="store_true",
                   help="make a CA and a serving certificate for SERVICE.NAMESPACE.svc in "
                        "--cert-dir (kept while they are good), print the caBundle, then serve")
    p.add_argument("--service", default=None,
                   help="with --self-signed: the webhook's Service name")
    p.add_argument("--namespace", default=None,
                   help="with --self-signed: the Service's namespace")
    p.add_argument("--cert-dir", default=None, metavar="DIR",
                   help="with --self-signed: where ca.crt, ca.key, tls.crt and tls.key go")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="with --self-signed: one more DNS name or IP address for the serving "
                        "certificate (repeatable; e.g. 127.0.0.1 to try it locally)")
    p.add_argument("--print-ca-bundle", action="store_true",
                   help="with --self-signed: print the caBundle and exit without serving")
    p.add_argument("--request-timeout", type=_timeout, default=None, metavar="DURATION",
                   help="time a client has for the TLS handshake, and then for each request "
                        "(default: 10s)")
    p.add_argument("--shutdown-delay", type=_duration, default=None, metavar="DURATION",
                   help="on SIGTERM, keep serving this long with /readyz failing, while the "
                        "API server learns that the pod is going (default: 5s)")
    p.set_defaults(func=main)
    return p


def _duration(text: str) -> float:
    """A duration as the config writes them ("10s", "500ms") or seconds."""
    from .fields import parse_duration

    try:
        return parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timeout(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration of more than 0, got {text!r}")
    return seconds


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_DNS_NAME = rf"(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*"


def _is_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    """`registrar webhook`: make the certificate if asked, then serve until
    SIGTERM or SIGINT."""
    import logging
    import re

    from .cli import EXIT_OK, UsageError
    from .source import parse_listen
    from .text import show

    if args.self_signed:
        for option in ("service", "namespace", "cert_dir"):
            if not getattr(args, option):
                raise UsageError(f"--self-signed needs --{option.replace('_', '-')}")
        for option in ("service", "namespace"):
            if not re.fullmatch(_DNS_LABEL, getattr(args, option)):
                raise UsageError(f"--{option}: expected a DNS label (lower case letters, digits, "
                                 f"'-'), got {show(getattr(args, option))}")
        for name in args.san:
            if not (re.fullmatch(_DNS_NAME, name) or _is_address(name)):
                raise UsageError(f"--san: expected a DNS name or an IP address, got {show(name)}")
        if args.cert_file or args.key_file:
            raise UsageError("--self-signed makes its own certificate: give --cert-dir, not "
                             "--cert-file or --key-file")
    else:
        for option in ("print_ca_bundle", "service", "namespace", "cert_dir", "san"):
            if getattr(args, option):
                raise UsageError(f"--{option.replace('_', '-')} goes with --self-signed")
    try:
        where = parse_listen(args.listen, any_port=True)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    if isinstance(where, str):
        raise UsageError(f"--listen: expected HOST:PORT (HTTPS over TCP), got {show(args.listen)}")

    from . import _webhook_server as server

    webhook = None
    if not args.print_ca_bundle:  # what serving needs, before any file is written
        from .admission import Webhook

        try:
            webhook = Webhook(_options(args.image))
        except ImportError as exc:
            raise UsageError(f"the webhook needs {exc.name or 'jsonpatch'}: "
                             f"pip install 'registrar[webhook]'") from None
    if args.self_signed:
        try:
            made = server.self_signed(args.cert_dir, args.service, args.namespace, args.san)
        except ImportError:
            raise UsageError("--self-signed needs the cryptography package: "
                             "pip install 'registrar[webhook]'") from None
        except OSError as exc:
            raise UsageError(f"--cert-dir: cannot write in {args.cert_dir}: "
                             f"{exc.strerror or exc}") from None
        print(made.ca_bundle, flush=True)
        logging.getLogger(__name__).info(
            "webhook: %s the certificate for %s.%s.svc in %s (caBundle: %s, printed)",
            "made" if made.issued else "kept", args.service, args.namespace, args.cert_dir,
            made.ca_file)
        if args.print_ca_bundle:
            return EXIT_OK
        cert_file, key_file = str(made.cert_file), str(made.key_file)
    else:
        cert_file = args.cert_file or f"{DEFAULT_CERT_DIR}/tls.crt"
        key_file = args.key_file or f"{DEFAULT_CERT_DIR}/tls.key"
    try:
        certs = server.CertificateFiles(cert_file, key_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    timing = {name: getattr(args, name) for name in ("request_timeout", "shutdown_delay")
              if getattr(args, name) is not None}
    try:
        httpd = server.WebhookServer(where, certs, webhook, **timing)
    except OSError as exc:
        raise UsageError(f"--listen: cannot listen on {args.listen}: "
                         f"{exc.strerror or exc}") from None
    return httpd.run()


def _options(image: str | None) -> Any:
    from . import inject

    return inject.Options(image=image) if image else inject.Options()
