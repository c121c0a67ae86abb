"""A pytest helper: the assertions of ``moola-engine verify`` inside a test.

    from moola_engine.testing import assert_run

    def test_two_phase_trains_encoder(tmp_path):
        outcome = train(cfg, strategy="two_phase")
        assert_run(outcome.run_dir, {"expect": [{"group": "encoder.layer0", "frozen_before": 10, "moves_after": 10}]})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moola_engine.checks.verify import Expectations, VerifyResult, events_path, load_expectations, verify_events
from moola_engine.config import structure
from moola_engine.logs import read_events


def assert_run(
    events: str | Path | Iterable[Mapping[str, Any]],
    expect: Expectations | Mapping[str, Any] | str | Path | None = None,
) -> VerifyResult:
    """Fail the test (AssertionError, one line per failure) when ``verify`` would fail.

    ``events``: a run folder, its events.jsonl, or event dicts (``RunLog(..., capture=True).events``).
    ``expect``: an :class:`Expectations`, a dict shaped like expect.toml, or the path of one.
    """
    if isinstance(expect, (str, Path)):
        expect = load_expectations(expect)
    elif isinstance(expect, Mapping):
        expect = structure(dict(expect), Expectations, source="assert_run(expect=...)")
    evs = read_events(events_path(events)) if isinstance(events, (str, Path)) else [dict(e) for e in events]
    result = verify_events(evs, expect)
    if result.failures:
        raise AssertionError("verify failed:\n" + "\n".join(f"  {line}" for line in result.failures))
    return result
