"""What a block of the rolling-restart bench measured, as table rows,
JSON lines and a plot."""
from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import dataclass, field

KINDS = ("refused", "reset", "timeout", "http5xx", "no_instance", "other")


@dataclass
class PodSpan:
    """A pod of a block: its address, and when it started and was deleted
    (time.monotonic(), as the consumers' records)."""
    addr: str
    started_at: float
    deleted_at: float | None = None


@dataclass
class Block:
    """One (registry, app, strategy): every consumer at once, rounds of
    rolling restarts."""
    registry: str
    strategy: str
    app: str
    t_go: float = 0.0  # the traffic started (time.monotonic())
    rounds: int = 0
    deletions: list[float] = field(default_factory=list)  # time.monotonic()
    stops: list[float] = field(default_factory=list)  # deletion -> last container exited
    records: dict[str, list[list]] = field(default_factory=dict)  # per consumer label
    cache_s: dict[str, float] = field(default_factory=dict)  # per cached consumer's label
    pods: list[PodSpan] = field(default_factory=list)  # every pod started, in start order
    seconds: float = 0.0
    unsettled: int = 0  # rounds after which a deleted pod was still listed at SETTLE_TIMEOUT
    error: str | None = None


def owners(block: Block, records: list[list]) -> list[int | None]:
    """Per request, the index in block.pods of the pod that had its address
    when it started (a port can be taken again by a later pod); None: no
    instance, or no pod had that address then."""
    by_addr: dict[str, list[tuple[float, int]]] = {}
    for i, pod in enumerate(block.pods):
        by_addr.setdefault(pod.addr, []).append((pod.started_at, i))
    for spans in by_addr.values():
        spans.sort()
    out: list[int | None] = []
    for rec in records:
        spans = by_addr.get(rec[3]) if rec[3] else None
        at = bisect.bisect_right(spans, (rec[1], len(block.pods))) if spans else 0
        out.append(spans[at - 1][1] if at else None)
    return out


def late_flags(block: Block, records: list[list]) -> list[bool]:
    """Per request: it started after the deletion of the pod it was sent to."""
    flags = []
    for rec, owner in zip(records, owners(block, records), strict=True):
        deleted = block.pods[owner].deleted_at if owner is not None else None
        flags.append(deleted is not None and rec[1] > deleted)
    return flags


def failed_after_deletions(block: Block, records: list[list]) -> list[tuple[float, int]]:
    """Per deleted pod, in deletion order: (deleted_at, the requests to it
    that failed and ended after its deletion: cut in flight, or sent late)."""
    failed = [0] * len(block.pods)
    for rec, owner in zip(records, owners(block, records), strict=True):
        if owner is None or rec[4] == "ok":
            continue
        deleted = block.pods[owner].deleted_at
        if deleted is not None and rec[2] >= deleted:
            failed[owner] += 1
    return sorted((pod.deleted_at, failed[i]) for i, pod in enumerate(block.pods)
                  if pod.deleted_at is not None)


def rows(block: Block, consumers: list[str]) -> list[dict]:
    """One row per consumer label (consumers.label())."""
    out = []
    stops = sorted(block.stops)
    for consumer in consumers:
        records = block.records.get(consumer, [])
        by_kind = {k: 0 for k in KINDS}
        for rec in records:
            if rec[4] != "ok":
                by_kind[rec[4] if rec[4] in by_kind else "other"] += 1
        late = late_flags(block, records)
        row = {"registry": block.registry, "strategy": block.strategy, "consumer": consumer,
               "app": block.app, "sent": len(records), "failed": sum(by_kind.values()),
               "failed_by_kind": by_kind,
               "late_requests": sum(late),
               "late_failed": sum(f and r[4] != "ok" for f, r in zip(late, records, strict=True)),
               "stop_p50_s": round(statistics.median(stops), 3) if stops else None,
               "stop_max_s": round(stops[-1], 3) if stops else None,
               "failed_per_pod": round(sum(by_kind.values()) / len(block.deletions), 2)
               if block.deletions else None,
               "pods_deleted": len(block.deletions), "rounds": block.rounds,
               "failed_after_deletion": [n for _, n in failed_after_deletions(block, records)]}
        if consumer in block.cache_s:
            row["cache_s"] = block.cache_s[consumer]
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
            f"{'timeout':>7} {'5xx':>4} {'no_inst':>7} {'late':>6}  {'stop p50':>8} {'max':>5} s")
    lines = [head, "-" * len(head)]
    for r in all_rows:
        k = r["failed_by_kind"]
        pct = 100 * r["failed"] / r["sent"] if r["sent"] else 0.0
        per_pod = "-" if r["failed_per_pod"] is None else f"{r['failed_per_pod']:6.1f}"
        line = (f"{r['registry']:9} {r['strategy']:13} {r['consumer']:11} {r['app']:8} "
                f"{r['sent']:6} {r['failed']:6} {pct:5.1f}% {r['pods_deleted']:4} {per_pod:>6}  "
                f"{k['refused']:7} {k['reset']:5} {k['timeout']:7} {k['http5xx']:4} "
                f"{k['no_instance']:7} {r['late_requests']:6}  {_secs(r['stop_p50_s']):>8} "
                f"{_secs(r['stop_max_s'])}")
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


# Per consumer kind (a label's first word): sent/s, and failed/s and late/s.
COLOURS = {"per-request": ("#555555", "#d62728"), "keepalive": ("#9e9e9e", "#1f77b4"),
           "cached": ("#bcbd22", "#9467bd")}
ANNOTATE_MAX = 40  # deletions in a panel up to which each gets its count of failures


def plot(blocks: list[Block], consumers: list[str], path: str) -> None:
    """Requests, failures and late requests per second over time, one panel
    per block: columns are strategies, rows are (registry, app). Late: sent
    to a pod after its deletion (whatever the outcome). Pod deletions
    dotted, each with the number of requests to that pod that failed after
    it (all consumers; up to ANNOTATE_MAX deletions a panel). Bins of 0.1
    to 1 s (about 150 per panel); the last, partial bin is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(b.strategy for b in blocks))
    lanes = list(dict.fromkeys((b.registry, b.app) for b in blocks))
    lane_h = 3.0 + 0.12 * len(consumers)  # the title has a line per consumer
    legend_h = 0.55 + 0.16 * len(consumers)  # a row per consumer, two lines of notes
    fig_h = lane_h * len(lanes) + legend_h
    fig, axes = plt.subplots(len(lanes), len(strategies), squeeze=False, sharey=True,
                             figsize=(max(4.2 * len(strategies), 5.0), fig_h))
    for ax in axes.flat:
        ax.set_visible(False)
    top = 1.0  # the highest rate drawn (the panels share their y axis)
    for b in blocks:
        ax = axes[lanes.index((b.registry, b.app))][strategies.index(b.strategy)]
        ax.set_visible(True)
        # Up to the last request of the consumer that stopped first.
        span = min((max(r[0] for r in b.records[c]) - b.t_go
                    for c in consumers if b.records.get(c)), default=1.0)
        bin_s = min(max(round(span / 150, 1), 0.1), 1.0)
        n = max(int(span / bin_s), 1)  # whole bins only
        end = n * bin_s
        totals = []
        after = {}  # deleted_at -> failed after it, every consumer
        for consumer in consumers:
            recs = b.records.get(consumer, [])
            if not recs:
                continue
            late = late_flags(b, recs)
            for t, count in failed_after_deletions(b, recs):
                after[t] = after.get(t, 0) + count
            totals.append(f"{consumer}: failed {sum(r[4] != 'ok' for r in recs)}"
                          f"/{len(recs)}, late {sum(late)}")
            sent, failed, sent_late = [0] * n, [0] * n, [0] * n
            for r, is_late in zip(recs, late, strict=True):
                i = int((r[0] - b.t_go) / bin_s)
                if 0 <= i < n:
                    sent[i] += 1
                    failed[i] += r[4] != "ok"
                    sent_late[i] += is_late
            xs = [i * bin_s for i in range(n + 1)]
            c_sent, c_fail = COLOURS.get(consumer.split()[0], ("gray", "black"))
            for counts, colour, style, lw, what in (
                    (sent, c_sent, "-", 0.8, "sent/s"), (failed, c_fail, "-", 1.0, "failed/s"),
                    (sent_late, c_fail, "--", 0.9, "late/s")):
                top = max(top, max(counts) / bin_s)
                # step(where="post") draws the last bin to its end
                ax.step(xs, [c / bin_s for c in counts + counts[-1:]], where="post",
                        color=colour, ls=style, lw=lw, label=f"{what} {consumer}")
        for d in b.deletions:
            ax.axvline(d - b.t_go, color="#2ca02c", lw=0.6, ls=":", alpha=0.8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlim(0, end)
        if len(after) <= ANNOTATE_MAX:
            for t, count in after.items():
                if count and 0 <= t - b.t_go <= end:
                    ax.annotate(str(count), (t - b.t_go, 1), xycoords=("data", "axes fraction"),
                                xytext=(1, -2), textcoords="offset points", fontsize=5,
                                rotation=90, ha="left", va="top", color="#2ca02c")
        ax.set_title(f"{b.registry} · {b.strategy} · {b.app}\n" + "\n".join(totals),
                     fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"s since traffic started (bins of {bin_s:g} s)", fontsize=7)
        if strategies.index(b.strategy) == 0:
            ax.set_ylabel("requests / s", fontsize=7)
    axes[0][0].set_ylim(0, top * 2)  # shared: no negative half of symlog, room at the top
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes.flat
                            if ax.get_visible() and ax.get_legend_handles_labels()[0]), ([], []))
    if handles:
        # Handles come per consumer (sent, failed, late); the legend fills
        # column by column: a row per consumer.
        order = [i for col in range(3) for i in range(col, len(labels), 3)]
        fig.legend([handles[i] for i in order], [labels[i] for i in order],
                   loc="lower center", bbox_to_anchor=(0.5, 0.3 / fig_h), ncol=3, fontsize=7)
        fig.text(0.5, 0.04 / fig_h, "late: sent to a pod after its deletion. Dotted: a pod "
                 "deleted; the number at its top: its\nrequests that failed after its "
                 "deletion (every consumer)", ha="center", va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, legend_h / fig_h if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
