"""The few exceptions moola-engine raises on purpose.

Every error a user can cause derives from :class:`MoolaError`; the CLI prints
its message (never a traceback) and exits with :attr:`MoolaError.exit_code`.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Every exit status of ``moola-engine`` (docs/reliability.md has the table; the CLI's help repeats it)."""

    OK = 0
    """The command did what was asked (``verify``: every check passed)."""
    VERIFY_FAILED = 1
    """``verify`` read the log and found a failure (a failed check, an unmet expectation, an unfinished run)."""
    USAGE = 2
    """Bad arguments, config, data or files: nothing (more) was trained; the message says what to change."""
    CHECK_FAILED = 3
    """A check stopped the run or refused to resume it (weights moved that must not, resume.check mismatch)."""
    INTERNAL = 4
    """An unexpected exception (a bug in moola-engine or a plugin): one line, the traceback saved to a file."""
    INTERRUPTED = 130
    """Ctrl-C (SIGINT); a run can be continued with ``train --resume``, an ablation by rerunning it."""


class MoolaError(Exception):
    """Base class: a problem a user can act on, with a message that says how."""

    exit_code = ExitCode.USAGE


class ConfigError(MoolaError):
    """A config file or value is invalid.

    ``source`` names the file (or ``"--flag"``); ``problems`` are one line each,
    in the form ``<what was wrong> @ $.<path.to.key>``.
    """

    def __init__(self, source: str, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = f"{source}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"{source}: {len(self.problems)} problems\n{lines}"
        super().__init__(msg)


class PluginError(MoolaError):
    """A plugin failed to load, failed validation, or raised inside a hook."""


class ScheduleError(MoolaError):
    """A strategy's schedule cannot do what it promises (e.g. a transition that never fires)."""


class GroupError(MoolaError):
    """A parameter is in no group or in two, or a group matches no parameter."""


class CheckFailed(MoolaError):
    """A verification check failed (weights moved that must not, did not move that must, ...)."""

    exit_code = ExitCode.CHECK_FAILED


class DataError(MoolaError):
    """Input data is malformed; the message names the file, row and column."""


class WeightsError(MoolaError):
    """Pretrained weights could not be loaded as asked (nothing matched, shapes differ, unsafe file)."""


class CheckpointError(MoolaError):
    """A checkpoint cannot be written or read back as a faithful copy of the run (or resumed as asked)."""
