"""Progress for ``pretrain``, ``train`` and ``ablate``: rich on a terminal, plain lines everywhere else.

On a terminal (``stream.isatty()`` and ``TERM`` is not ``dumb``) a :class:`Bar`
is a rich progress bar: what is counted (epochs, runs), the current phase
(which groups train), the loss and rich's ETA.  While it is shown, writes to
``sys.stderr`` (the event log's console lines) are printed above the bar by
rich, so the two never garble each other.

Without a terminal (CI, pipes, files) it prints one plain line per step of
progress (no carriage return, no ANSI escape), which a log keeps::

    train 3/30 epochs  phase encoder.layer0, head  loss 0.6123 (val 0.6502)  elapsed 4s  eta 36s
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from moola_engine.core.hookspecs import hookimpl


def is_terminal(stream: IO[str]) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Bar:
    """One progress bar: ``done`` of ``total`` ``unit``; a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, *, done: int = 0, unit: str = "epochs", label: str = "",
                 stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.total, self.unit, self.label = total, unit, label
        self.done: float = done
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.start_done: float = done
        self.t0 = time.perf_counter()
        self.phase: str | None = None
        self.loss: str | None = None
        self._rich: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            console = Console(file=self.stream, force_terminal=True)
            self._rich = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn(unit), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, redirect_stderr=self.stream is sys.stderr,
                redirect_stdout=False,
            )
            self._task = self._rich.add_task(label, total=total, completed=done, info="")
            self._rich.start()

    # ------------------------------------------------------------------ the text of one line
    def info(self, what: str = "") -> str:
        parts = [what] if what else []
        if self.phase is not None:
            parts.append(f"phase {self.phase}")
        if self.loss is not None:
            parts.append(f"loss {self.loss}")
        return "  ".join(parts)

    def line(self, what: str = "") -> str:
        """The plain line: label, count, what, phase, loss, elapsed and ETA (from the pace since this bar began)."""
        elapsed = time.perf_counter() - self.t0
        ran = self.done - self.start_done
        eta = f"  eta {duration(elapsed / ran * (self.total - self.done))}" if ran > 0 and self.done < self.total else ""
        head = f"{self.label} " if self.label else ""
        info = self.info(what)
        return f"{head}{self.done:g}/{self.total} {self.unit}{'  ' + info if info else ''}  elapsed {duration(elapsed)}{eta}"

    # ------------------------------------------------------------------ updates
    def update(self, *, advance: int = 0, done: float | None = None, what: str = "", phase: str | None = None,
               loss: str | None = None, emit: bool = True) -> None:
        """Move the bar (by ``advance``, or to ``done``); on a terminal redraw it, otherwise print one plain line
        (``emit=False``: no line)."""
        self.done = done if done is not None else self.done + advance
        if phase is not None:
            self.phase = phase
        if loss is not None:
            self.loss = loss
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, info=self.info(what))
        elif emit:
            self.stream.write(self.line(what) + "\n")
            self.stream.flush()

    def show(self, what: str = "") -> None:
        self.update(what=what)

    def advance(self, what: str = "") -> None:
        self.update(advance=1, what=what)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TrainProgress:
    """Observer plugin: one bar over a run's epochs, with the phase (the groups that train) and the losses."""

    def __init__(self, epochs: int, stream: IO[str] | None = None, label: str = "train") -> None:
        self.bar = Bar(epochs, unit="epochs", label=label, stream=stream)
        self._started = False

    @hookimpl(trylast=True)
    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        if not self._started:  # a resumed run starts at its checkpoint's epoch
            self._started = True
            self.bar.done = self.bar.start_done = epoch
            self.bar.t0 = time.perf_counter()
        phase = ", ".join(engine.freezer.trainable_groups()) or "(nothing trains)"
        self.bar.update(phase=phase, emit=False)

    @hookimpl(trylast=True)
    def on_epoch_end(self, engine: Any, epoch: int, metrics: Any) -> None:
        loss = metrics.get("train_loss")
        val = metrics.get("val_loss")
        text = f"{loss:.4f}" if isinstance(loss, float) else "-"
        if isinstance(val, float):
            text += f" (val {val:.4f})"
        self.bar.update(advance=1, loss=text)

    def close(self) -> None:
        self.bar.close()
