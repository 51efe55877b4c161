"""`./dev demo` end to end on etcd: the rolling restart it plays must show
registrar losing no request, beside the naive way's loss, in its table."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@pytest.mark.slow
def test_demo_rolling_restart_on_etcd(tmp_path):
    plot = tmp_path / "timeline.png"
    done = subprocess.run([sys.executable, str(DEMO), "--plot", str(plot)],
                          check=False, capture_output=True, text=True, timeout=180)
    out = done.stdout
    totals = {m["strategy"]: (int(m["sent"]), int(m["lost"])) for m in re.finditer(
        r"^(?P<strategy>naive|registrar) +all +(?P<sent>\d+) +(?P<lost>\d+) +stop p50", out,
        re.MULTILINE)}
    assert set(totals) == {"naive", "registrar"}, f"no closing table:\n{out}\n{done.stderr}"
    assert totals["registrar"][0] > 0 and totals["registrar"][1] == 0, out
    assert totals["naive"][1] > 0, out  # the TTL keeps a dead pod listed for 10 s
    assert done.returncode == 0, out + done.stderr
    if importlib.util.find_spec("matplotlib"):
        assert f"timeline plot: {plot}" in out and plot.stat().st_size > 0, out
