"""What a block of bench/services.py measured, as rows: a markdown table
and JSON lines."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

KINDS = ("refused", "reset", "timeout", "http_status", "other")


@dataclass
class PodStop:
    """One deleted pod."""
    name: str
    port: int
    deleted_at: float  # time.monotonic()
    lag_drawn: float
    lag_s: float | None  # applied: the deletion until its endpoint was out of the Service
    stop_s: float | None  # the deletion until its container exited
    stop_log: list[str] = field(default_factory=list)  # registrar's lines about the consumers
    # registrar's own figure: its consumers went quiet this long after its
    # stop began (~ the deletion); the rest of its stop is the connections'
    # drain and the app's exit.
    quiet_s: float | None = None


@dataclass
class Block:
    """One (lag spread, app, strategy), every consumer at once."""
    lags: str  # the spread, as given: "0.1-3"
    app: str
    strategy: str
    t_go: float = 0.0
    stops: list[PodStop] = field(default_factory=list)
    records: dict[str, list[list]] = field(default_factory=dict)  # per consumer
    done: dict[str, dict] = field(default_factory=dict)  # each consumer's closing counts
    seconds: float = 0.0
    #: ``git describe --always --dirty`` of the tree registrar runs from, when
    #: the block began (an editable install: a pod runs the code of its start)
    code: str | None = None
    error: str | None = None


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile: p50 is the median, others the nearest rank."""
    if not values:
        return None
    if p == 50:
        return statistics.median(values)
    s = sorted(values)
    return s[max(math.ceil(p / 100 * len(s)) - 1, 0)]


def _r(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


def lost_per_pod(block: Block, records: list[list]) -> list[int]:
    """Per deleted pod (deletion order), the requests that failed (ended)
    from its deletion until the next one (or the end)."""
    times = [s.deleted_at for s in block.stops]
    out = [0] * len(times)
    for rec in records:
        if rec[3] == "ok":
            continue
        k = None
        for i, t in enumerate(times):
            if rec[2] >= t:
                k = i
            else:
                break
        if k is not None:
            out[k] += 1
    return out


def rows(block: Block, consumers: list[str]) -> list[dict]:
    out = []
    done = [s for s in block.stops if s.stop_s is not None and s.lag_s is not None]
    stops = [s.stop_s for s in done]
    lags = [s.lag_s for s in done]
    diffs = [s.stop_s - s.lag_s for s in done]
    ratios = [s.stop_s / s.lag_s for s in done if s.lag_s > 0]
    quiet_diffs = [s.quiet_s - s.lag_s for s in done if s.quiet_s is not None]
    for consumer in consumers:
        records = block.records.get(consumer, [])
        by_kind = {k: 0 for k in KINDS}
        for rec in records:
            if rec[3] != "ok":
                by_kind[rec[3] if rec[3] in by_kind else "other"] += 1
        lost = sum(by_kind.values())
        per_pod = lost_per_pod(block, records)
        row = {"lags": block.lags, "app": block.app, "strategy": block.strategy,
               "consumer": consumer, "sent": len(records), "lost": lost,
               "lost_by_kind": by_kind, "stops": len(block.stops),
               "lost_per_stop": round(lost / len(block.stops), 2) if block.stops else None,
               "stop_p50_s": _r(pct(stops, 50)), "stop_p90_s": _r(pct(stops, 90)),
               "stop_max_s": _r(max(stops) if stops else None),
               "lag_p50_s": _r(pct(lags, 50)),
               "stop_minus_lag_p50_s": _r(pct(diffs, 50)),
               "stop_over_lag_p50": _r(pct(ratios, 50), 2),
               "quiet_minus_lag_p50_s": _r(pct(quiet_diffs, 50)),
               # Per deleted pod: [stop_s, lag_s (applied), lag drawn, lost by this
               # consumer, registrar's quiet_s]
               "per_pod": [[_r(s.stop_s), _r(s.lag_s), _r(s.lag_drawn), n, _r(s.quiet_s)]
                        for s, n in zip(block.stops, per_pod, strict=True)]}
        extra = block.done.get(consumer) or {}
        if "opened" in extra:
            row["connections_opened"] = extra["opened"]
            row["connections_dropped"] = extra["dropped"]
        if extra.get("fell_behind"):
            row["fell_behind"] = extra["fell_behind"]
        if block.code:
            row["code"] = block.code
        if block.error:
            row["error"] = block.error
        out.append(row)
    return out


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(all_rows: list[dict]) -> str:
    lines = ["| lag (s) | app | strategy | consumer | lost / sent | lost by kind | stops "
             "| stop p50 / p90 (s) | lag p50 (s) | stop − lag p50 (s) | stop / lag p50 "
             "| quiet − lag p50 (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        kinds = ", ".join(f"{k} {n:,}" for k, n in r["lost_by_kind"].items() if n) or "-"
        strategy = "**registrar**" if r["strategy"] == "registrar" else r["strategy"]
        line = (f"| {r['lags']} | {r['app']} | {strategy} | {r['consumer']} "
                f"| {r['lost']:,} / {r['sent']:,} | {kinds} | {r['stops']} "
                f"| {_s(r['stop_p50_s'])} / {_s(r['stop_p90_s'])} | {_s(r['lag_p50_s'])} "
                f"| {_s(r['stop_minus_lag_p50_s'])} | {_s(r['stop_over_lag_p50'])} "
                f"| {_s(r['quiet_minus_lag_p50_s'])} |")
        if r.get("error"):
            line += f" ERROR: {r['error']}"
        lines.append(line)
    return "\n".join(lines)


def json_lines(all_rows: list[dict], run: dict) -> str:
    return "\n".join(json.dumps({**run, **r}) for r in all_rows)
