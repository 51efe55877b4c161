"""Library mode inside a real ASGI server (uvicorn owns the main loop and its
signal handlers): on SIGTERM the pod leaves every etcd member's view while
the app still serves, and only then does uvicorn shut down."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid

import pytest
import yaml

from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable

pytest.importorskip("uvicorn")

APP = textwrap.dedent('''
    import sys, time
    from registrar import Registrar

    registrar = Registrar.from_config(sys.argv[1])

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    registrar.start()
                    registrar.install_signal_handlers()  # after uvicorn's: they chain
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    report = registrar.stop()  # the same report the signal produced
                    print("SHUTDOWN", time.monotonic(), report.summary(), flush=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
''')


def test_sigterm_deregisters_before_uvicorn_stops_serving(tmp_path, etcd_cluster):
    service, port = f"asgi-{uuid.uuid4().hex[:8]}", free_port()
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
        "service": {"name": service, "port": port},
        "backends": [{"type": "etcd", "endpoints": etcd_cluster.endpoints, "ttl": "3s"}],
        "stop": {"grace_period": "10s"}}))
    key = f"services/{service}/10.1.1.1:{port}"
    env = {**os.environ, "POD_NAME": "asgi-0", "POD_IP": "10.1.1.1"}
    app = subprocess.Popen([sys.executable, str(tmp_path / "app.py"), str(tmp_path / "agent.yaml"),
                            str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    gone: dict[int, float] = {}
    served: list[tuple[float, bool]] = []
    done = threading.Event()

    def watch_members():
        while not done.is_set() and len(gone) < 3:
            for i, ep in enumerate(etcd_cluster.endpoints):
                if i not in gone and not kv_get_serializable(ep, key)[1]:
                    gone[i] = time.monotonic()
            time.sleep(0.002)

    def poll_app():
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    served.append((time.monotonic(), r.status == 200))
            except OSError:
                served.append((time.monotonic(), False))
            time.sleep(0.003)

    try:
        wait_until(lambda: all(kv_get_serializable(ep, key)[1] for ep in etcd_cluster.endpoints),
                 15, "every member lists the app")
        threads = [threading.Thread(target=f, daemon=True) for f in (watch_members, poll_app)]
        for t in threads:
            t.start()
        wait_until(lambda: any(ok for _, ok in served), 5, "the app serves")
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=15)
    finally:
        done.set()
        app.kill()
        out, err = app.communicate(timeout=5)
    assert len(gone) == 3, f"not every member dropped the key: {gone}\n{err}"
    removed = max(gone.values())
    first_refusal = min((t for t, ok in served if not ok), default=float("inf"))
    assert removed < first_refusal, "the app stopped serving before every member dropped it"
    shutdown_line = next(line for line in out.splitlines() if line.startswith("SHUTDOWN"))
    assert float(shutdown_line.split()[1]) > removed
    assert "deregistered after SIGTERM" in shutdown_line and "confirmed 3/3" in shutdown_line
