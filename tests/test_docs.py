"""Meta-tests: every hook and every event has a heading in docs/; every emitted event is declared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

from moola_engine.core.hookspecs import all_hook_names
from moola_engine.logs import Event

DOCS = ROOT / "docs"


def headings(path: Path) -> set[str]:
    return {m.group(1).strip().strip("`") for m in re.finditer(r"^#{2,3} (.+)$", path.read_text(), re.M)}


@pytest.mark.parametrize("hook", all_hook_names())
def test_every_hook_has_a_heading(hook: str) -> None:
    assert hook in headings(DOCS / "hooks.md")


@pytest.mark.parametrize("event", [e.value for e in Event])
def test_every_event_has_a_heading(event: str) -> None:
    assert event in headings(DOCS / "events.md")


def test_no_documented_event_is_undeclared() -> None:
    declared = {e.value for e in Event}
    documented = {h for h in headings(DOCS / "events.md") if re.fullmatch(r"[a-z_]+\.[a-z_]+", h)}
    assert documented <= declared


def test_hookspecs_docstring_shows_every_hook_in_the_loop() -> None:
    from moola_engine.core import hookspecs

    doc = hookspecs.__doc__ or ""
    for hook in all_hook_names():
        assert hook in doc, hook
