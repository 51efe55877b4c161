"""AdmissionReview v1 (admission.k8s.io/v1) in, AdmissionReview out: what
`registrar webhook` answers on POST /mutate, without the HTTP around it.

For a Pod CREATE it runs ``inject_pod`` (the transformation of `registrar
inject`) on the pod and, when that changed anything, answers with a
JSONPatch (RFC 6902, made by the jsonpatch library) from the pod as the API
server sent it to the pod as injected, paths from the Pod's root. Anything
else (other kinds, other operations, subresources) is allowed unchanged. A
pod that cannot be injected is allowed unchanged with a warning, or refused
when its annotation says ``registrar.io/inject: "required"``. A body that is
no AdmissionReview gets an HTTP error whose body is AdmissionReview-shaped
(with the review's uid when it has one). Dry runs are injected like the real
thing: the injection has no side effect (``sideEffects: None``), and a
server-side dry run then shows the pod as it would be created.
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from .text import printable, show

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
#: The annotation that asks for injection ("true", or "required": refuse
#: the pod when it cannot be injected).
INJECT = "registrar.io/inject"
#: Request body, bytes: the API server's own limit on a request (3 MiB); a
#: review of a larger pod cannot exist. Beyond it: 413, unread.
MAX_BODY = 3 * 2**20
#: Kubernetes shows at most this much of one warning (it may cut longer ones).
MAX_WARNING = 256
MAX_WARNINGS = 20


@dataclass
class Answer:
    """What to send back: the HTTP status, the AdmissionReview (or error)
    document, and the line to log (nothing of the pod's content but its
    name: annotations may hold a token)."""
    status: int
    body: dict[str, Any]
    summary: str
    level: int = logging.INFO
    #: A malformed request (logged rate-limited: anyone may send them); the
    #: summary then says what is wrong, after where it came from.
    bad: bool = False


class Webhook:
    """Turns AdmissionReview bodies into answers. ``options`` goes to
    ``inject_pod`` for every pod."""

    def __init__(self, options: Any = None):
        import jsonpatch  # the webhook extra; checked at start, not at the first pod

        from . import inject

        self._jsonpatch = jsonpatch
        self._inject = inject
        self.options = options if options is not None else inject.Options()

    def review(self, body: bytes, content_type: str | None) -> Answer:
        """The answer to one POST /mutate."""
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return _refused(415, None, f"expected Content-Type application/json, got "
                                       f"{show(content_type or '(none)')}")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return _refused(400, None, f"malformed JSON: {_first_line(exc)}")
        if not isinstance(doc, dict):
            return _refused(400, None, "expected an AdmissionReview object")
        request = doc.get("request")
        uid = request.get("uid") if isinstance(request, dict) else None
        uid = uid if isinstance(uid, str) and uid else None
        if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview":
            return _refused(400, uid, f"expected apiVersion {API_VERSION}, kind AdmissionReview, "
                                      f"got {show(doc.get('apiVersion'))}, "
                                      f"{show(doc.get('kind'))}")
        if not isinstance(request, dict):
            return _refused(400, None, "the AdmissionReview has no request")
        if uid is None:
            return _refused(400, None, f"request.uid: expected a string, got "
                                       f"{show(request.get('uid'))}")
        return self._admit(request, uid)

    def _admit(self, request: dict[str, Any], uid: str) -> Answer:
        kind = request.get("kind")
        operation = request.get("operation")
        obj = request.get("object")
        metadata = obj.get("metadata") if isinstance(obj, dict) else None
        who = _who(request, metadata)
        if not (isinstance(kind, dict) and kind.get("group", "") == ""
                and kind.get("kind") == "Pod"):
            what = (f"{kind.get('group')}/{kind.get('kind')}".lstrip("/")
                    if isinstance(kind, dict) else show(kind))
            return _allowed(uid, f"{who}: not injected: a {printable(str(what))}, not a Pod")
        if operation != "CREATE":
            return _allowed(uid, f"{who}: not injected: operation {show(operation)}")
        if request.get("subResource"):
            return _allowed(uid, f"{who}: not injected: subresource "
                                 f"{show(request['subResource'])}")
        if not isinstance(metadata, dict) or not isinstance(obj.get("spec"), dict):
            return _refused(400, uid, "request.object: expected a Pod with metadata and spec")
        pod = {"metadata": metadata, "spec": obj["spec"]}
        annotations = metadata.get("annotations")
        wanted = annotations.get(INJECT) if isinstance(annotations, dict) else None
        required = wanted == "required"
        try:
            injected = self._inject.inject_pod(pod, self.options)
        except self._inject.InjectError as exc:
            return self._not_injected(uid, who, _first_line(exc), required)
        except Exception:  # a bug in one pod's injection must not take the server
            log.exception("webhook: %s (uid %s): the injection failed", who, uid)
            return self._not_injected(uid, who, "internal error (see the webhook's log)",
                                      required)
        warnings = _warnings(injected.warnings)
        if not injected.changed:
            if wanted is None:
                why = f"no {INJECT} annotation"
            elif wanted not in ("true", "required"):
                why = f"{INJECT} is {show(wanted)}"
            else:
                why = "injected already"
            return _allowed(uid, f"{who}: not injected: {why}", warnings)
        patch = self._patch(pod, injected.pod, who)
        response: dict[str, Any] = {"uid": uid, "allowed": True}
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        if warnings:
            response["warnings"] = warnings
        note = f", {len(warnings)} warning(s)" if warnings else ""
        return Answer(200, _review(response),
                      f"{who}: injected ({len(patch)} patch operations{note})")

    def _not_injected(self, uid: str, who: str, why: str, required: bool) -> Answer:
        message = f"registrar: cannot inject: {why}"
        if required:
            return Answer(200, _review({"uid": uid, "allowed": False,
                                        "status": {"code": 400, "reason": "BadRequest",
                                                   "message": message}}),
                          f'{who}: refused ({INJECT}: "required"): {why}', logging.WARNING)
        warnings = _warnings([f"not injected: {why}"])
        return Answer(200, _review({"uid": uid, "allowed": True, "warnings": warnings}),
                      f"{who}: allowed unchanged: {why}", logging.WARNING)

    def _patch(self, original: dict, injected: dict, who: str) -> list[dict[str, Any]]:
        """The JSONPatch from one to the other, paths from the Pod's root.
        Checked by applying it: should the library ever produce a patch that
        does not lead there, replace metadata and spec whole instead."""
        jsonpatch = self._jsonpatch
        patch = jsonpatch.make_patch(original, injected).patch
        try:
            ok = jsonpatch.apply_patch(original, patch) == injected
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
            ok = False
        if ok:
            return patch
        log.warning("webhook: %s: the computed JSONPatch does not reproduce the injected pod; "
                    "replacing metadata and spec whole", who)
        return [{"op": "replace", "path": f"/{key}", "value": injected[key]}
                for key in ("metadata", "spec") if original.get(key) != injected.get(key)]


def _review(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _allowed(uid: str, summary: str, warnings: list[str] | None = None) -> Answer:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if warnings:
        response["warnings"] = warnings
    return Answer(200, _review(response), summary)


def _refused(status: int, uid: str | None, why: str) -> Answer:
    """An HTTP error whose body is an AdmissionReview that refuses (what an
    API server, or a person with curl, can read), with the uid if known."""
    response: dict[str, Any] = {"allowed": False, "status": {"code": status, "message": why}}
    if uid is not None:
        response = {"uid": uid, **response}
    where = f" (uid {printable(uid)})" if uid is not None else ""
    return Answer(status, _review(response), f"{where}: {why} ({status})", logging.WARNING,
                  bad=True)


def _who(request: dict[str, Any], metadata: Any) -> str:
    """namespace/name of the pod for the log: a CREATE through a controller
    has only a generateName (shown with a trailing ``*``), and the namespace
    is the request's (the pod's own is often empty)."""
    meta = metadata if isinstance(metadata, dict) else {}
    namespace = request.get("namespace") or meta.get("namespace") or "-"
    name = meta.get("name") or request.get("name")
    if not name and meta.get("generateName"):
        name = f"{meta['generateName']}*"
    text = f"{namespace}/{name or '?'} (uid {request.get('uid')})"
    return printable(text if len(text) <= 300 else text[:297] + "...")


def _warnings(warnings: list[str]) -> list[str]:
    """Each warning on one printable line, prefixed with who says it, at
    most as long as Kubernetes shows."""
    out = []
    for warning in warnings[:MAX_WARNINGS]:
        text = printable(" ".join(str(warning).split()))
        text = text if text.startswith("registrar") else f"registrar: {text}"
        out.append(text if len(text) <= MAX_WARNING else text[:MAX_WARNING - 3] + "...")
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return printable(text[0] if text else type(exc).__name__)
