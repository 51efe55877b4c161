"""What the rolling-restart benches' command lines share (rolling_restart.py,
services.py): progress on stderr, comma-separated choices, the load options."""
from __future__ import annotations

import argparse
import sys


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split(text: str, known, what: str) -> list[str]:
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in known]
    if unknown or not wanted:
        raise SystemExit(f"unknown {what} {unknown or text!r}; known: {', '.join(known)}")
    return wanted


def add_load_arguments(parser: argparse.ArgumentParser, goes_on: str) -> None:
    """--min-requests (``goes_on``: what repeats until then), --rate,
    --work-ms, --pods, --grace."""
    parser.add_argument("--min-requests", type=int, default=50_000,
                        help=f"{goes_on} go on until every consumer sent this many (per row)")
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s per consumer")
    parser.add_argument("--work-ms", type=float, default=20.0, help="the app's time per request")
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="terminationGracePeriodSeconds (and registrar's stop.grace_period)")
