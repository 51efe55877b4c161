"""bench/apps/vip_consumer.py as a subprocess: a client of the Service's
virtual IP, from a loopback address of its own."""
from __future__ import annotations

from pathlib import Path

from rr.consumers import ConsumerProcess
from rr.pods import APPS, PY

# Each consumer binds its own source address: the pods see two peers, as
# two client pods with their own IPs (and neither is 127.0.0.1, where the
# readiness probes and the kubelet's preStop httpGet come from).
CLIENTS = {"per-request": "127.0.0.2", "keepalive": "127.0.0.3"}


class VipConsumer(ConsumerProcess):
    """bench/apps/vip_consumer.py: sends to the Service's virtual IP."""

    def __init__(self, client: str, vip: str, out: Path, rate: float, max_seconds: float,
                 timeout: float = 5.0):
        self.client = client
        self.source = CLIENTS[client]
        super().__init__(client, out, [
            PY, str(APPS / "vip_consumer.py"), "--vip", vip, "--source", self.source,
            "--client", client, "--out", str(out), "--rate", f"{rate:g}",
            "--timeout", f"{timeout:g}", "--max-seconds", f"{max_seconds:g}"])
