"""What a block of the rolling-restart bench measured, as table rows,
JSON lines and a plot."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

KINDS = ("refused", "reset", "timeout", "http5xx", "no_instance", "other")


@dataclass
class Block:
    """One (registry, app, strategy): both consumers at once, rounds of
    rolling restarts."""
    registry: str
    strategy: str
    app: str
    t_go: float = 0.0  # the traffic started (time.monotonic())
    rounds: int = 0
    deletions: list[float] = field(default_factory=list)  # time.monotonic()
    stops: list[float] = field(default_factory=list)  # deletion -> last container exited
    records: dict[str, list[list]] = field(default_factory=dict)  # per consumer kind
    seconds: float = 0.0
    unsettled: int = 0  # rounds after which a deleted pod was still listed at SETTLE_TIMEOUT
    error: str | None = None


def rows(block: Block, consumers: list[str]) -> list[dict]:
    out = []
    stops = sorted(block.stops)
    for consumer in consumers:
        records = block.records.get(consumer, [])
        by_kind = {k: 0 for k in KINDS}
        for rec in records:
            if rec[4] != "ok":
                by_kind[rec[4] if rec[4] in by_kind else "other"] += 1
        row = {"registry": block.registry, "strategy": block.strategy, "consumer": consumer,
               "app": block.app, "sent": len(records), "failed": sum(by_kind.values()),
               "failed_by_kind": by_kind,
               "stop_p50_s": round(statistics.median(stops), 3) if stops else None,
               "stop_max_s": round(stops[-1], 3) if stops else None,
               "failed_per_pod": round(sum(by_kind.values()) / len(block.deletions), 2)
               if block.deletions else None,
               "pods_deleted": len(block.deletions), "rounds": block.rounds}
        if block.unsettled:
            row["unsettled_rounds"] = block.unsettled
        if block.error:
            row["error"] = block.error
        out.append(row)
    return out


def _secs(v: float | None) -> str:
    return "    -" if v is None else f"{v:5.2f}"


def table(all_rows: list[dict]) -> str:
    head = (f"{'registry':9} {'strategy':13} {'consumer':11} {'app':8} {'sent':>6} "
            f"{'failed':>6} {'%':>6} {'pods':>4} {'/pod':>6}  {'refused':>7} {'reset':>5} "
            f"{'timeout':>7} {'5xx':>4} {'no_inst':>7}  {'stop p50':>8} {'max':>5} s")
    lines = [head, "-" * len(head)]
    for r in all_rows:
        k = r["failed_by_kind"]
        pct = 100 * r["failed"] / r["sent"] if r["sent"] else 0.0
        per_pod = "-" if r["failed_per_pod"] is None else f"{r['failed_per_pod']:6.1f}"
        line = (f"{r['registry']:9} {r['strategy']:13} {r['consumer']:11} {r['app']:8} "
                f"{r['sent']:6} {r['failed']:6} {pct:5.1f}% {r['pods_deleted']:4} {per_pod:>6}  "
                f"{k['refused']:7} {k['reset']:5} {k['timeout']:7} {k['http5xx']:4} "
                f"{k['no_instance']:7}  {_secs(r['stop_p50_s']):>8} {_secs(r['stop_max_s'])}")
        if k["other"]:
            line += f"  (other {k['other']})"
        if r.get("unsettled_rounds"):
            line += f"  ({r['unsettled_rounds']} round(s) ended with a deleted pod still listed)"
        if r.get("error"):
            line += f"  ERROR: {r['error']}"
        lines.append(line)
    return "\n".join(lines)


def json_lines(all_rows: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in all_rows)


COLOURS = {"per-request": ("#555555", "#d62728"), "keepalive": ("#9e9e9e", "#1f77b4")}


def plot(blocks: list[Block], consumers: list[str], path: str) -> None:
    """Requests and failures per second over time, one panel per block:
    columns are strategies, rows are (registry, app); pod deletions dotted.
    Bins of 0.1 to 1 s (about 150 per panel); the last, partial bin is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(b.strategy for b in blocks))
    lanes = list(dict.fromkeys((b.registry, b.app) for b in blocks))
    fig, axes = plt.subplots(len(lanes), len(strategies), squeeze=False, sharey=True,
                             figsize=(4.2 * len(strategies), 2.9 * len(lanes)))
    for ax in axes.flat:
        ax.set_visible(False)
    for b in blocks:
        ax = axes[lanes.index((b.registry, b.app))][strategies.index(b.strategy)]
        ax.set_visible(True)
        # Up to the last request of the consumer that stopped first.
        span = min((max(r[0] for r in b.records[c]) - b.t_go
                    for c in consumers if b.records.get(c)), default=1.0)
        bin_s = min(max(round(span / 150, 1), 0.1), 1.0)
        n = max(int(span / bin_s), 1)  # whole bins only
        end = n * bin_s
        for consumer in consumers:
            recs = b.records.get(consumer, [])
            if not recs:
                continue
            sent, failed = [0] * n, [0] * n
            for r in recs:
                i = int((r[0] - b.t_go) / bin_s)
                if 0 <= i < n:
                    sent[i] += 1
                    failed[i] += r[4] != "ok"
            xs = [i * bin_s for i in range(n + 1)]
            sent.append(sent[-1])  # step(where="post") draws the last bin to its end
            failed.append(failed[-1])
            c_sent, c_fail = COLOURS.get(consumer, ("gray", "black"))
            ax.step(xs, [s / bin_s for s in sent], where="post", color=c_sent, lw=0.8,
                    label=f"sent/s {consumer}")
            ax.step(xs, [f / bin_s for f in failed], where="post", color=c_fail, lw=1.0,
                    label=f"failed/s {consumer}")
        for d in b.deletions:
            ax.axvline(d - b.t_go, color="#2ca02c", lw=0.6, ls=":", alpha=0.8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlim(0, end)
        totals = "  ".join(
            f"{c}: {sum(r[4] != 'ok' for r in b.records.get(c, []))}/{len(b.records.get(c, []))}"
            for c in consumers)
        ax.set_title(f"{b.registry} · {b.strategy} · {b.app}\nfailed {totals}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"s since traffic started (bins of {bin_s:g} s; dotted: a pod deleted)",
                      fontsize=7)
        if strategies.index(b.strategy) == 0:
            ax.set_ylabel("requests / s", fontsize=7)
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes.flat
                            if ax.get_visible() and ax.get_legend_handles_labels()[0]), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
