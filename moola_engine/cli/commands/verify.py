"""``moola-engine verify runs/<id>/events.jsonl [--expect expect.toml]``: exit 1 with one line per failure."""

from __future__ import annotations

import argparse

from moola_engine.checks.redflags import compare_runs
from moola_engine.checks.verify import events_path, load_expectations, verify_events
from moola_engine.logs import read_events


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="re-read a run's event log; exit 1 if a check failed or an expectation is not met")
    p.add_argument("events", help="runs/<id>/events.jsonl (or the run folder)")
    p.add_argument("--expect", metavar="FILE", help="expect.toml: per-group expectations and [weights] min_loaded")
    p.add_argument("--control", metavar="RUN_DIR",
                   help="random-encoder control run: raise a red flag if its validation predictions equal this run's")
    return p


def run(args: argparse.Namespace) -> int:
    expect = load_expectations(args.expect) if args.expect else None
    path = events_path(args.events)
    events = read_events(path)
    if args.control:
        run_dir = path.parent
        events += [{"event": "red_flag.raised", "code": f.code, "message": f.message}
                   for f in compare_runs(run_dir, args.control)]
    result = verify_events(events, expect)
    for line in result.warnings:
        print(f"warning: {line}")
    for line in result.failures:
        print(f"FAIL {line}")
    if result.failures:
        print(f"verify: {len(result.failures)} failure(s) in {path}")
        return 1
    print(f"ok: {path}: {result.summary()}")
    return 0
