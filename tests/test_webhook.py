"""`registrar webhook`, the real process over real HTTPS: it is started as a
user would (`registrar webhook --self-signed`, on a free 127.0.0.1 port) and
spoken to with `requests`, verifying its certificate against the caBundle it
printed. The AdmissionReview v1 bodies are built as an API server builds
them, from the annotated pod templates shipped in config/k8s/ and from small
pods of our own; the JSONPatch answered, applied with the jsonpatch library,
must give what inject_pod() gives. Bad requests (malformed, oversized, slow,
not a review) get an error or a closed connection, quickly, and the server
goes on serving. The manifests in config/k8s/webhook/ are checked with
kubernetes-validate --strict and against the command line they run."""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jsonpatch
import pytest
import requests
import yaml
from registrar_testing import free_port, wait_until
from registrar_testing.kubernetes import OLDEST, validate_strictly, validator
from registrar_testing.certs import CertificateAuthority

from registrar import cli
from registrar.inject import INJECT, INJECTED, TOKEN, Options, inject_pod
from registrar.webhook import add_parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "k8s"
WEBHOOK_K8S = K8S / "webhook"
REGISTRAR = str(Path(sys.executable).with_name("registrar"))
#: What --image says: not inject's default, to see that it is passed on.
IMAGE = "registry.example/registrar:webhook-test"
SERVICE, NAMESPACE = "registrar-webhook", "registrar-system"
#: Seconds the test servers give a client for the handshake and each request.
REQUEST_TIMEOUT = 1.0
#: Kubernetes' first version with native sidecars on by default; and the newest known.


# -- the process ---------------------------------------------------------------------------


class Webhook:
    """One `registrar webhook` process: its caBundle, its address, its log."""

    def __init__(self, workdir: Path, args: list[str]):
        self.workdir = workdir
        self.port = free_port()
        self.out_path, self.log_path = workdir / "stdout", workdir / "webhook.log"
        argv = [REGISTRAR, "webhook", "--listen", f"127.0.0.1:{self.port}",
                "--image", IMAGE, "--request-timeout", str(REQUEST_TIMEOUT),
                "--log-level", "debug", *args]
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL)
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_file: str | None = None

    def wait_serving(self, ca_file: str | None = None) -> Webhook:
        if ca_file is None:  # --self-signed: the caBundle it printed, one line
            line = wait_until(lambda: self._first_line() or self._died(), 30,
                              "the webhook printed its caBundle")
            self.ca_bundle = line
            self.ca_file = str(self.workdir / "ca-from-bundle.pem")
            Path(self.ca_file).write_bytes(base64.b64decode(line, validate=True))
        else:
            self.ca_file = ca_file
        wait_until(lambda: self._died() or self.get("/healthz").status_code == 200, 30,
                   "the webhook answers /healthz", ignore=requests.ConnectionError)
        return self

    def _first_line(self) -> str | None:
        text = self.out_path.read_text()
        return text.split("\n", 1)[0] if "\n" in text else None

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"registrar webhook exited {self.proc.returncode}: {self.log}")
        return False

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, verify=self.ca_file, timeout=5, **kwargs)

    def post(self, body: bytes | dict, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        # As the API server calls it: the path of clientConfig and its timeout.
        return requests.post(self.url + "/mutate?timeout=5s", data=data, verify=self.ca_file,
                             timeout=5, headers={"Content-Type": content_type, **(headers or {})})

    def tls(self) -> ssl.SSLSocket:
        """A TLS connection of our own, for what requests will not send."""
        context = ssl.create_default_context(cafile=self.ca_file)
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def self_signed_args(cert_dir: Path) -> list[str]:
    return ["--self-signed", "--service", SERVICE, "--namespace", NAMESPACE,
            "--cert-dir", str(cert_dir), "--san", "127.0.0.1", "--shutdown-delay", "0"]


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webhook")
    server = Webhook(workdir, self_signed_args(workdir / "certs"))
    try:
        yield server.wait_serving()
    finally:
        server.stop()


@pytest.fixture
def own_webhook(tmp_path):
    """A webhook of the test's own (to stop, or to change its certificate)."""
    started = []

    def start(args: list[str], ca_file: str | None = None) -> Webhook:
        server = Webhook(tmp_path, args)
        started.append(server)
        return server.wait_serving(ca_file)

    yield start
    for server in started:
        server.stop()


# -- reviews as the API server sends them ------------------------------------------------------


def review(pod: dict, *, namespace: str = "team-a", operation: str = "CREATE",
           kind: dict | None = None, uid: str | None = None, **request) -> dict:
    """An AdmissionReview v1 for ``pod`` (metadata and spec), as the API
    server sends it for a pod a controller creates: generateName, no
    namespace in the object, status empty."""
    obj = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(pod), "status": {}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid or str(uuid.uuid4()),
                        "kind": kind or {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": namespace, "operation": operation,
                        "userInfo": {"username": "system:serviceaccount:kube-system:"
                                                 "replicaset-controller"},
                        "object": obj, "oldObject": None, "dryRun": False,
                        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
                        **request}}


def answered(resp: requests.Response, uid: str) -> dict:
    """The response of a 200 AdmissionReview answer, for ``uid``."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    doc = resp.json()
    assert (doc["apiVersion"], doc["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert doc["response"]["uid"] == uid
    return doc["response"]


def patched(review_doc: dict, response: dict) -> dict:
    """The object as the API server makes it: the JSONPatch applied to what it sent."""
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"], validate=True))
    assert isinstance(patch, list) and patch
    assert all(op["path"].startswith(("/metadata", "/spec")) for op in patch), patch
    return jsonpatch.apply_patch(review_doc["request"]["object"], patch)


def expected(pod: dict, token: str) -> dict:
    """What inject_pod() makes of ``pod`` with the webhook's options (the
    token it drew, taken from its answer: a pod without one gets a random one)."""
    result = inject_pod(pod, Options(image=IMAGE, token=token))
    assert result.changed
    return result.pod


def small_pod(**annotations: str) -> dict:
    return {"metadata": {"generateName": "web-7c9d8-", "labels": {"app": "web"},
                         "annotations": {INJECT: "true", **annotations}},
            "spec": {"containers": [{"name": "web", "image": "registry.example/web:1.0",
                                     "ports": [{"containerPort": 8080}]}]}}


def _shipped_templates() -> list[tuple[str, dict]]:
    """(file: kind/name, pod template) of every annotated pod template (and
    bare pod) in config/k8s, the webhook's own manifests aside."""
    found = []
    for path in sorted(K8S.rglob("*.y*ml")):
        if WEBHOOK_K8S in path.parents:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Pod":
                template = {"metadata": doc.get("metadata") or {}, "spec": doc.get("spec")}
            else:
                template = (doc.get("spec") or {}).get("template")
            annotations = ((template or {}).get("metadata") or {}).get("annotations") or {}
            if annotations.get(INJECT) in ("true", "required") and INJECTED not in annotations:
                name = (doc.get("metadata") or {}).get("name", "?")
                found.append((f"{path.relative_to(K8S)}: {doc['kind']}/{name}", template))
    return found


SHIPPED = _shipped_templates()


def test_config_k8s_ships_annotated_templates():
    """The inputs of the tests below: without them they would test nothing."""
    assert SHIPPED, f"no pod template annotated {INJECT} in {K8S}"
    assert _generated_pairs(), f"no input in {K8S / 'in'} with its output in {K8S}"


def _as_created(template: dict, name: str) -> dict:
    """A template's pod as a ReplicaSet creates it: generateName, the labels."""
    pod = copy.deepcopy(template)
    pod["metadata"].pop("name", None)
    pod["metadata"]["generateName"] = f"{name}-5d8f7c6b9-"
    return pod


@pytest.mark.parametrize("where,template", SHIPPED, ids=[w for w, _ in SHIPPED])
def test_shipped_template_is_injected_as_inject_does(webhook, where, template):
    pod = _as_created(template, "web")
    doc = review(pod)
    response = answered(webhook.post(doc), doc["request"]["uid"])
    result = patched(doc, response)
    assert (result["apiVersion"], result["kind"], result["status"]) == ("v1", "Pod", {})
    token = result["metadata"]["annotations"][TOKEN]
    assert {"metadata": result["metadata"], "spec": result["spec"]} == expected(pod, token)
    # Reinvocation (another webhook changed the pod after us): nothing more.
    again = review({"metadata": result["metadata"], "spec": result["spec"]})
    response = answered(webhook.post(again), again["request"]["uid"])
    assert response["allowed"] is True and "patch" not in response, response


def _generated_pairs() -> list[tuple[str, Path, Path]]:
    """(name, input, what `registrar inject` made of it) as shipped:
    config/k8s/in/NAME and config/k8s/NAME."""
    return [(p.name, p, K8S / p.name) for p in sorted((K8S / "in").glob("*.y*ml"))
            if (K8S / p.name).exists()]


@pytest.mark.parametrize("name,source,generated", _generated_pairs(),
                         ids=[n for n, _, _ in _generated_pairs()])
def test_the_webhook_gives_what_registrar_inject_gives(webhook, name, source, generated):
    """The shipped input through the webhook = the shipped output of
    `registrar inject`, exactly: inject reads the ConfigMap beside the
    Deployment, the webhook (no API access) cannot, and neither needs it to
    write the pod (what the pod says wins; inject refuses a ConfigMap that
    disagrees)."""
    docs = {d["kind"]: d for d in yaml.safe_load_all(source.read_text()) if d}
    template = docs["Deployment"]["spec"]["template"]
    doc = review(_as_created(template, "web"))
    result = patched(doc, answered(webhook.post(doc), doc["request"]["uid"]))
    token = result["metadata"]["annotations"][TOKEN]
    [made] = [d for d in yaml.safe_load_all(generated.read_text())
              if d and d["kind"] == "Deployment"]
    made = made["spec"]["template"]
    # The token it drew, and the image of its --image.
    text = json.dumps(made).replace(made["metadata"]["annotations"][TOKEN], token)
    made = json.loads(text.replace(f'"{Options().image}"', json.dumps(IMAGE)))
    made["metadata"]["generateName"] = result["metadata"]["generateName"]
    assert {"metadata": result["metadata"], "spec": result["spec"]} == made


def test_small_pod_is_injected_as_inject_does(webhook):
    pod = small_pod()
    doc = review(pod)
    response = answered(webhook.post(doc), doc["request"]["uid"])
    result = patched(doc, response)
    token = result["metadata"]["annotations"][TOKEN]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token), "a token drawn for this pod"
    assert {"metadata": result["metadata"], "spec": result["spec"]} == expected(pod, token)
    # --image reached the injection; the pod was not named by us.
    images = [c["image"] for c in result["spec"].get("initContainers", [])
              + result["spec"]["containers"]]
    assert IMAGE in images
    assert "name" not in result["metadata"]
    # The pod's own token is kept, and two pods get two tokens.
    mine = "a-token-of-my-own-0123456789"
    doc = review(small_pod(**{TOKEN: mine}))
    kept = patched(doc, answered(webhook.post(doc), doc["request"]["uid"]))
    assert kept["metadata"]["annotations"][TOKEN] == mine
    doc = review(pod)
    other = patched(doc, answered(webhook.post(doc), doc["request"]["uid"]))
    assert other["metadata"]["annotations"][TOKEN] != token


def test_required_annotation_injects_too(webhook):
    pod = small_pod(**{INJECT: "required"})
    doc = review(pod)
    result = patched(doc, answered(webhook.post(doc), doc["request"]["uid"]))
    assert result["metadata"]["annotations"][INJECTED]


@pytest.mark.parametrize("annotations", [{}, {INJECT: "false"}],
                         ids=["no annotation", "false"])
def test_a_pod_not_annotated_gets_no_patch(webhook, annotations):
    pod = small_pod()
    pod["metadata"]["annotations"] = dict(annotations)
    doc = review(pod)
    response = answered(webhook.post(doc), doc["request"]["uid"])
    assert response == {"uid": doc["request"]["uid"], "allowed": True}


def test_an_injected_pod_gets_no_patch(webhook):
    pod = small_pod()
    injected = inject_pod(pod, Options(image=IMAGE)).pod
    doc = review(injected)
    response = answered(webhook.post(doc), doc["request"]["uid"])
    assert response["allowed"] is True
    assert "patch" not in response and "patchType" not in response


def test_a_pod_that_cannot_be_injected(webhook):
    """Required: refused, with inject's one line. Otherwise: created as
    written, with that line as a warning the user sees in kubectl."""
    pod = small_pod(**{INJECT: "required", "registrar.io/mode": "bogus"})
    doc = review(pod)
    refused = doc["request"]["uid"]
    response = answered(webhook.post(doc), refused)
    assert response["allowed"] is False and "patch" not in response
    message = response["status"]["message"]
    assert response["status"]["code"] == 400
    assert "\n" not in message
    assert message.startswith("registrar: cannot inject: registrar.io/mode is"), message
    assert "bogus" in message

    pod["metadata"]["annotations"][INJECT] = "true"
    doc = review(pod)
    response = answered(webhook.post(doc), doc["request"]["uid"])
    assert response["allowed"] is True and "patch" not in response
    [warning] = response["warnings"]
    assert warning.startswith("registrar: not injected: registrar.io/mode is") and len(
        warning) <= 256, warning
    # A line each in the log, naming the pod and the review.
    lines = {f"team-a/web-7c9d8-* (uid {refused}): refused ({INJECT}: \"required\"): "
             "registrar.io/mode is",
             f"team-a/web-7c9d8-* (uid {doc['request']['uid']}): allowed unchanged: "
             "registrar.io/mode is"}
    wait_until(lambda: all(line in webhook.log for line in lines), 5, "both logged")


@pytest.mark.parametrize("change", [
    {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    {"operation": "UPDATE"},
    {"operation": "DELETE"},
    {"operation": "CONNECT"},
    {"subResource": "ephemeralcontainers"},
], ids=["Deployment", "UPDATE", "DELETE", "CONNECT", "subresource"])
def test_what_is_not_a_pod_creation_is_allowed_unchanged(webhook, change):
    doc = review(small_pod())
    doc["request"].update(change)
    response = answered(webhook.post(doc), doc["request"]["uid"])
    assert response == {"uid": doc["request"]["uid"], "allowed": True}


def test_a_dry_run_is_injected_like_the_real_thing(webhook):
    """sideEffects: None: `kubectl apply --dry-run=server` shows the pod as
    it would be created."""
    pod = small_pod()
    doc = review(pod, dryRun=True)
    result = patched(doc, answered(webhook.post(doc), doc["request"]["uid"]))
    token = result["metadata"]["annotations"][TOKEN]
    assert {"metadata": result["metadata"], "spec": result["spec"]} == expected(pod, token)


# -- what is not a review ------------------------------------------------------------------


def _refused(resp: requests.Response, status: int, uid: str | None, message: str) -> None:
    """An HTTP error whose body is an AdmissionReview that refuses."""
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert doc["kind"] == "AdmissionReview" and doc["response"]["allowed"] is False
    assert doc["response"]["status"]["code"] == status
    assert message in doc["response"]["status"]["message"], doc
    assert doc["response"].get("uid") == uid


def _review_bytes(**top) -> bytes:
    doc = review(small_pod(), uid="7f1c")
    doc.update(top)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("body,content_type,status,uid,message", [
    (b"{", "application/json", 400, None, "malformed JSON"),
    (b"\xff\xfe", "application/json", 400, None, "malformed JSON"),
    (b"[" * 100000 + b"]" * 100000, "application/json", 400, None, "malformed JSON"),
    (b"[]", "application/json", 400, None, "expected an AdmissionReview"),
    (_review_bytes(apiVersion="admission.k8s.io/v1beta1"), "application/json", 400, "7f1c",
     "expected apiVersion admission.k8s.io/v1"),
    (_review_bytes(kind="Pod"), "application/json", 400, "7f1c", "kind AdmissionReview"),
    (_review_bytes(request=None), "application/json", 400, None, "has no request"),
    (json.dumps({**review(small_pod()), "request": {"kind": {"kind": "Pod"}}}).encode(),
     "application/json", 400, None, "request.uid"),
    (json.dumps({**review(small_pod(), uid="9a9a"), "request": {
        **review(small_pod())["request"], "uid": "9a9a", "object": "a pod"}}).encode(),
     "application/json", 400, "9a9a", "request.object"),
    (_review_bytes(), "text/plain", 415, None, "Content-Type application/json"),
    (_review_bytes(), "", 415, None, "Content-Type application/json"),
], ids=["truncated", "not UTF-8", "nested deep", "a list", "v1beta1", "wrong kind",
        "no request", "no uid", "no object", "text/plain", "no type"])
def test_a_bad_review_gets_an_error_review(webhook, body, content_type, status, uid, message):
    headers = {"Content-Type": content_type} if content_type else {}
    resp = requests.post(webhook.url + "/mutate", data=body, verify=webhook.ca_file, timeout=5,
                         headers=headers)
    if not content_type:
        assert "Content-Type" not in resp.request.headers
    _refused(resp, status, uid, message)
    _still_serving(webhook)


def _still_serving(webhook: Webhook) -> None:
    doc = review(small_pod())
    started = time.monotonic()
    response = answered(webhook.post(doc), doc["request"]["uid"])
    assert response["patchType"] == "JSONPatch"
    assert time.monotonic() - started < 4


def _exchange(webhook: Webhook, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a connection of our own; read until the server
    closes it: (what it answered, seconds it took)."""
    with webhook.tls() as sock:
        started = time.monotonic()
        sock.sendall(data)
        sock.settimeout(wait)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        return received, time.monotonic() - started


@pytest.mark.parametrize("head,status", [
    (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n", 411),
    (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n", 400),
    (b"GET /mutate HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"PUT /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 501),
    (b"POST /mutate HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
    (b"GARBAGE\r\n\r\n", 400),
], ids=["chunked", "no length", "bad length", "GET", "404", "PUT", "many headers", "garbage"])
def test_http_that_is_refused(webhook, head, status):
    received, took = _exchange(webhook, head)
    assert received.startswith(f"HTTP/1.1 {status} ".encode()) or (
        status == 400 and received.startswith(b"HTTP/1.0 400")), received[:200]
    assert b"Connection: close" in received and took < 3
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
    _still_serving(webhook)


def test_an_oversized_body_is_refused_unread(webhook):
    # The head alone: 413 at once, without waiting for a body never sent.
    head = (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5242880\r\n\r\n")
    received, took = _exchange(webhook, head)
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert took < 3, f"{took:.1f}s: it waited for the body"
    # requests sending all 5 MiB: the 413, or the connection closed under it.
    started = time.monotonic()
    try:
        resp = webhook.post(b'{"x": "' + b"a" * (5 * 2**20) + b'"}')
    except requests.ConnectionError:
        pass
    else:
        assert resp.status_code == 413 and "at most 3145728 bytes" in resp.json()["error"]
    assert time.monotonic() - started < 5
    # And Expect: 100-continue gets the 413 instead of the go-ahead.
    received, _ = _exchange(webhook, head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue"
                                                              b"\r\n\r\n"))
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    _still_serving(webhook)


def test_slow_clients_are_cut_off(webhook):
    """Each of these holds a connection; the server closes it within its
    request timeout (1 s here) and answers the others meanwhile."""
    body = _review_bytes()
    head = (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    limit = REQUEST_TIMEOUT + 2.0  # and the watchdog's tick, on a busy machine

    # No TLS handshake at all.
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < limit
    # A handshake, then nothing.
    _, took = _exchange(webhook, b"")
    assert took < limit
    # The head, then the body never comes: 408.
    received, took = _exchange(webhook, head + body[:10])
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert took < limit
    # Half a head.
    _, took = _exchange(webhook, head[:30])
    assert took < limit

    # A byte every 0.3 s: no read waits long, the request does.
    with webhook.tls() as sock:
        sock.settimeout(0.3)
        started, closed = time.monotonic(), False
        for i, byte in enumerate(head):
            try:
                sock.sendall(bytes([byte]))
                closed = sock.recv(100) == b""
            except TimeoutError:
                pass  # nothing to read: still open
            except (OSError, ssl.SSLError):
                closed = True
            if closed or time.monotonic() - started > limit + 3:
                break
            if i == 1:
                _still_serving(webhook)  # the others are answered meanwhile
        assert closed, "a byte every 0.3 s kept the connection open"
        assert time.monotonic() - started < limit + 0.5
    _still_serving(webhook)


def test_a_flood_of_connections_does_not_lock_reviews_out(own_webhook, tmp_path):
    """More connections than the server takes (128), none sending a byte,
    and deadlines too long to help (30 s): each new one evicts the oldest
    that has not sent a request, so a review still gets through at once."""
    args = self_signed_args(tmp_path / "certs") + ["--request-timeout", "30s"]
    server = own_webhook(args)
    flood = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
             for _ in range(200)]
    try:
        _still_serving(server)
        evicted = 0
        for sock in flood[:50]:  # the oldest: closed to make room
            sock.settimeout(5)
            try:
                evicted += sock.recv(1) == b""
            except ConnectionResetError:
                evicted += 1
        assert evicted == 50
    finally:
        for sock in flood:
            sock.close()
    assert "closing a new one" not in server.log


def test_keep_alive_serves_many_reviews_on_one_connection(webhook):
    with requests.Session() as session:
        for _ in range(5):
            doc = review(small_pod())
            resp = session.post(webhook.url + "/mutate", json=doc, verify=webhook.ca_file,
                                timeout=5)
            answered(resp, doc["request"]["uid"])


def test_probes(webhook):
    assert webhook.get("/healthz").json() == {"status": "alive"}
    assert webhook.get("/readyz").json() == {"ready": True}


# -- certificates ---------------------------------------------------------------------------


def test_self_signed_certificate_and_ca_bundle(webhook, tmp_path):
    from cryptography import x509

    cert_dir = webhook.workdir / "certs"
    assert base64.b64decode(webhook.ca_bundle) == (cert_dir / "ca.crt").read_bytes()
    assert "\n" not in webhook.ca_bundle
    for name in ("ca.key", "tls.key"):
        assert (cert_dir / name).stat().st_mode & 0o777 == 0o600, name
    cert = x509.load_pem_x509_certificate((cert_dir / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{SERVICE}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    assert f"{SERVICE}.{NAMESPACE}.svc.cluster.local" in names.get_values_for_type(x509.DNSName)
    # The server's certificate is that one, and it is trusted by that CA alone.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(webhook.url + "/healthz", timeout=5)  # the system's CAs

    # --print-ca-bundle: the same CA again (the script may run twice), no serving.
    done = subprocess.run([REGISTRAR, "webhook", *self_signed_args(cert_dir),
                           "--print-ca-bundle"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == webhook.ca_bundle + "\n"
    # Another directory: another CA.
    done = subprocess.run([REGISTRAR, "webhook", "--self-signed", "--service", "other",
                           "--namespace", "ns", "--cert-dir", str(tmp_path / "c"),
                           "--print-ca-bundle"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.strip() != webhook.ca_bundle
    other = x509.load_pem_x509_certificate((tmp_path / "c" / "tls.crt").read_bytes())
    assert "other.ns.svc" in other.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def _kubelet_secret_volume(directory: Path, version: str, pair) -> None:
    """The Secret's files as the kubelet writes them: tls.crt -> ..data/tls.crt,
    ..data -> ..<version>, and a new version by swapping ..data at once."""
    target = directory / f"..{version}"
    target.mkdir()
    shutil.copy(pair.cert_file, target / "tls.crt")
    shutil.copy(pair.key_file, target / "tls.key")
    link = directory / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_a_rotated_certificate_is_served_from_the_next_connection(own_webhook, tmp_path):
    first, second = (CertificateAuthority(tmp_path / n, f"CA {n}") for n in ("one", "two"))
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    _kubelet_secret_volume(mounted, "v1", first.server("a", hosts=("127.0.0.1",)))
    server = own_webhook(["--cert-file", str(mounted / "tls.crt"),
                          "--key-file", str(mounted / "tls.key")], ca_file=first.ca_file)
    with requests.Session() as kept:  # a connection made before the rotation
        assert kept.get(server.url + "/healthz", verify=first.ca_file, timeout=5).ok

        _kubelet_secret_volume(mounted, "v2", second.server("b", hosts=("127.0.0.1",)))
        resp = requests.get(server.url + "/healthz", verify=second.ca_file, timeout=5)
        assert resp.ok
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(server.url + "/healthz", verify=first.ca_file, timeout=5)
        assert kept.get(server.url + "/healthz", verify=first.ca_file, timeout=5).ok
    wait_until(lambda: "certificate reloaded" in server.log, 5, "the reload logged")

    # Files that do not load (a half-written rotation): the last good ones stay.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tls.crt").write_text("not a certificate")
    (broken / "tls.key").write_text("not a key")
    _kubelet_secret_volume(mounted, "v3", type("Pair", (), {
        "cert_file": broken / "tls.crt", "key_file": broken / "tls.key"}))
    assert requests.get(server.url + "/healthz", verify=second.ca_file, timeout=5).ok
    assert requests.get(server.url + "/healthz", verify=second.ca_file, timeout=5).ok
    wait_until(lambda: "still serving the previous certificate" in server.log, 5,
               "the broken files reported")
    assert server.log.count("still serving the previous certificate") == 1, "once per change"


def test_a_client_that_does_not_trust_the_certificate_is_explained(webhook):
    other = ssl.create_default_context()  # the system's CAs: not ours
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            other.wrap_socket(raw, server_hostname="127.0.0.1")
    wait_until(lambda: "is the MutatingWebhookConfiguration's caBundle the CA" in webhook.log,
               5, "the failed handshake explained")


# -- the process as a whole --------------------------------------------------------------------


def test_secrets_never_reach_the_log(own_webhook, tmp_path):
    token = "tok-" + uuid.uuid4().hex
    header = "hdr-" + uuid.uuid4().hex
    server = own_webhook(self_signed_args(tmp_path / "certs"))
    auth = {"Authorization": f"Bearer {header}"}
    for pod in (small_pod(**{TOKEN: token}),
                small_pod(**{TOKEN: token, INJECT: "required", "registrar.io/mode": "x"}),
                small_pod(**{TOKEN: token, "registrar.io/mode": "x"})):
        doc = review(pod)
        assert server.post(doc, headers=auth).status_code == 200
    bad = json.dumps(review(small_pod(**{TOKEN: token}))).encode()
    server.post(bad[:-20], headers=auth)
    server.post(bad, content_type="text/plain", headers=auth)
    _exchange(server, b"POST /mutate HTTP/1.1\r\nAuthorization: Bearer " + header.encode()
              + b"\r\nContent-Length: 99999999\r\n\r\n")
    server.stop()
    log = server.log
    assert "injected (" in log and "refused (" in log and "allowed unchanged" in log
    assert token not in log and header not in log


def test_sigterm_fails_readyz_then_exits(own_webhook, tmp_path):
    args = self_signed_args(tmp_path / "certs")
    args[args.index("--shutdown-delay") + 1] = "1.5s"
    server = own_webhook(args)
    server.proc.send_signal(signal.SIGTERM)
    resp = wait_until(lambda: (r := server.get("/readyz")).status_code == 503 and r.json(), 2,
                      "/readyz fails")
    assert resp == {"ready": False}
    _still_serving(server)  # reviews are still answered meanwhile
    assert server.proc.wait(timeout=10) == 0
    assert "webhook: stopped" in server.log


def test_the_command_line_stays_light():
    """The cli builds its parser, the webhook command's included, on every
    run (`registrar prestop` too): nothing of the server comes with it."""
    heavy = ["http.server", "ssl", "jsonpatch", "cryptography", "registrar.inject",
             "registrar.admission", "registrar._webhook_server"]
    code = (f"import sys; from registrar import cli; cli._parser(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("args,message", [
    (["--service", "x"], "--service goes with --self-signed"),
    (["--self-signed", "--service", "x", "--namespace", "y"], "--self-signed needs --cert-dir"),
    (["--self-signed", "--service", "X_Y", "--namespace", "y", "--cert-dir", "d"],
     "--service: expected a DNS label"),
    (["--cert-file", "/nonexistent/tls.crt", "--key-file", "/nonexistent/tls.key"],
     "cannot load the certificate /nonexistent/tls.crt"),
    (["--self-signed", "--service", "x", "--namespace", "y", "--cert-dir", "d", "--san",
      "a b"], "--san: expected a DNS name or an IP address"),
    (["--listen", "unix:/tmp/x.sock"], "--listen: expected HOST:PORT"),
    (["--request-timeout", "soon"], "expected a duration"),
])
def test_usage_errors_are_one_line(args, message, tmp_path):
    done = subprocess.run([REGISTRAR, "webhook", *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stdout == ""


# -- the manifests ---------------------------------------------------------------------------

#: Kinds of cert-manager's CRDs: kubernetes-validate knows the built-in kinds
#: only, and cert-manager validates its own (its webhook) when they are applied.
CERT_MANAGER_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}


def _manifest(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((WEBHOOK_K8S / name).read_text()) if d]


def _by_kind(name: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in _manifest(name):
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_the_webhook_manifests_are_these():
    assert sorted(p.name for p in WEBHOOK_K8S.iterdir()) == [
        "cert-manager.yaml", "mutating-webhook.yaml", "webhook.yaml"]
    assert [d["kind"] for d in _manifest("webhook.yaml")] == [
        "ServiceAccount", "Service", "Deployment", "PodDisruptionBudget"]
    assert [d["kind"] for d in _manifest("mutating-webhook.yaml")] == [
        "MutatingWebhookConfiguration"]
    assert [d["kind"] for d in _manifest("cert-manager.yaml")] == [
        "Issuer", "Certificate", "Issuer", "Certificate", "MutatingWebhookConfiguration"]


@pytest.mark.parametrize("name", ["webhook.yaml", "mutating-webhook.yaml", "cert-manager.yaml"])
def test_webhook_manifest_is_valid_kubernetes(name, tmp_path):
    docs = _manifest(name)
    if name == "mutating-webhook.yaml":  # as the install script makes it
        text = (WEBHOOK_K8S / name).read_text()
        assert text.count('caBundle: ""') == 1
        made = subprocess.run([REGISTRAR, "webhook", *self_signed_args(tmp_path),
                               "--print-ca-bundle"], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        bundle = made.stdout.strip()
        docs = [d for d in yaml.safe_load_all(text.replace('caBundle: ""', f"caBundle: {bundle}"))
                if d]
        assert docs[0]["webhooks"][0]["clientConfig"]["caBundle"] == bundle
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CERT_MANAGER_KINDS:
            continue
        assert "namespace" not in doc["metadata"], "namespace-neutral"
        validate_strictly(doc, name)


def _webhook_config(name: str) -> dict:
    [config] = _by_kind(name)["MutatingWebhookConfiguration"]
    return config


def test_mutating_webhook_configuration():
    objects = _by_kind("webhook.yaml")
    [deployment], [service] = objects["Deployment"], objects["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [hook] = _webhook_config("mutating-webhook.yaml")["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Ignore"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["namespaceSelector"] == {"matchLabels": {"registrar.io/inject": "enabled"}}
    [rule] = hook["rules"]
    assert rule == {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                    "operations": ["CREATE"], "scope": "Namespaced"}
    # The webhook is never asked about its own pods.
    [expression] = hook["objectSelector"]["matchExpressions"]
    assert expression["operator"] == "NotIn"
    assert pod_labels[expression["key"]] in expression["values"]
    # It calls the Service, which leads to the container's port.
    target = hook["clientConfig"]["service"]
    assert target["name"] == service["metadata"]["name"] == SERVICE
    assert target["namespace"] == NAMESPACE and target["path"] == "/mutate"
    [port] = service["spec"]["ports"]
    assert port["port"] == target["port"] == 443
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]] == 8443


def test_the_cert_manager_variant_agrees():
    plain = _webhook_config("mutating-webhook.yaml")
    managed = _webhook_config("cert-manager.yaml")
    assert "caBundle" not in managed["webhooks"][0]["clientConfig"]
    without = copy.deepcopy(plain)
    del without["webhooks"][0]["clientConfig"]["caBundle"]
    assert without["webhooks"] == managed["webhooks"]
    objects = _by_kind("cert-manager.yaml")
    serving = next(c for c in objects["Certificate"] if not c["spec"].get("isCA"))
    ca = next(c for c in objects["Certificate"] if c["spec"].get("isCA"))
    issuers = {i["metadata"]["name"]: i for i in objects["Issuer"]}
    assert "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]["spec"]
    assert issuers[serving["spec"]["issuerRef"]["name"]]["spec"]["ca"]["secretName"] == \
        ca["spec"]["secretName"]
    assert managed["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{NAMESPACE}/{serving['metadata']['name']}"
    assert f"{SERVICE}.{NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    [deployment] = _by_kind("webhook.yaml")["Deployment"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert serving["spec"]["secretName"] in [v["secret"]["secretName"] for v in volumes]


def test_the_deployment_runs_the_webhook_as_it_should():
    objects = _by_kind("webhook.yaml")
    [deployment], [pdb], [account] = (objects["Deployment"], objects["PodDisruptionBudget"],
                                      objects["ServiceAccount"])
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # The command line parses, as the image's ENTRYPOINT (registrar) gets it.
    args = cli._parser().parse_args(container["args"])
    assert args.command == "webhook" and args.func.__module__ == "registrar.webhook"
    assert args.listen == "0.0.0.0:8443" and not args.self_signed
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (args.cert_file, args.key_file):
        [mount] = [m for m in mounts.values() if Path(path).parent == Path(m["mountPath"])]
        assert mount["readOnly"] and "subPath" not in mount, "subPath mounts are never updated"
        assert "secret" in volumes[mount["name"]]
    assert args.image == container["image"]
    # Probes over HTTPS on the served port.
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, "https", "HTTPS")
    # Pod Security "restricted", and no API access.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    # Time for the shutdown delay and the grace (5 s + 2 s by default).
    assert pod["terminationGracePeriodSeconds"] >= 10
    assert "cpu" not in container["resources"]["limits"]
    # The budget keeps one replica.
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


# -- docs/webhook.md -----------------------------------------------------------------------

DOC = ROOT / "docs" / "webhook.md"


def _doc_scripts() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)


def test_doc_commands_parse():
    commands = []
    for script in _doc_scripts():
        for line in script.replace("\\\n", " ").splitlines():
            for found in re.findall(r"\bregistrar (webhook [^)|]*)", line):
                commands.append(found)
    assert len(commands) >= 2
    for command in commands:
        args = cli._parser().parse_args(shlex.split(command))
        assert args.command == "webhook", command


def test_doc_self_signed_install_script_runs(tmp_path):
    """The --self-signed install, as written, with a kubectl that only
    records what it is given: the Secret's files exist, and the
    MutatingWebhookConfiguration applied has the caBundle of their CA and is
    valid Kubernetes."""
    kv = validator()
    [script] = [s for s in _doc_scripts() if "--print-ca-bundle" in s]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(
        '#!/bin/sh\necho "$*" >> "$KUBECTL_LOG"\n'
        'case " $* " in *" -f - "*) cat > "$KUBECTL_LOG.stdin" ;; esac\n')
    (bin_dir / "kubectl").chmod(0o755)
    (tmp_path / "config").symlink_to(ROOT / "config")
    log = tmp_path / "kubectl.log"
    env = {"PATH": f"{bin_dir}:{Path(REGISTRAR).parent}:{os.environ['PATH']}",
           "KUBECTL_LOG": str(log)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    [secret] = [c for c in calls if c.startswith("-n registrar-system create secret tls")]
    for option in re.findall(r"--(?:cert|key)=(\S+)", secret):
        assert (tmp_path / option).is_file()
    applied = yaml.safe_load(Path(f"{log}.stdin").read_text())
    bundle = applied["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(bundle) == (tmp_path / "registrar-webhook-certs" / "ca.crt"
                                        ).read_bytes()
    kv.validate(applied, OLDEST, strict=True)


def test_doc_names_what_exists():
    text = DOC.read_text()
    for path in set(re.findall(r"config/k8s/webhook/[\w.-]+", text)):
        assert (ROOT / path).is_file(), path
    for name in re.findall(r"`([\w-]+\.yaml)`", text):
        assert (WEBHOOK_K8S / name).is_file(), name
    # Every --option it names is the webhook's, but kubectl's and the agent's --set.
    parser = add_parser(argparse.ArgumentParser().add_subparsers(), [])
    options = {o for action in parser._actions for o in action.option_strings}
    others = {"--dry-run", "--show-labels", "--cert", "--key", "--set"}
    for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)) - others:
        assert option in options, option
