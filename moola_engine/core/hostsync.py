"""Find host-device syncs inside the training step loop.

A GPU runs ahead of Python only while nothing asks it for a value: ``.item()``,
``float(t)``, ``bool(t)``, ``nonzero``, boolean-mask indexing, ``unique``...
each stalls the host until the device has caught up.  The engine keeps them
out of its step loop (loss accumulates on the device, checks run at epoch ends
and transitions).  :func:`sync_guard` proves it:

* on CUDA it is ``torch.cuda.set_sync_debug_mode(mode)`` for the duration of
  the loop (``"warn"`` or ``"error"``), restored afterwards;
* on CPU, where nothing syncs, it watches the dispatcher for the operators that
  *would* sync on a GPU (:data:`SYNC_OPS`) and warns or raises the same way,
  so the property is tested on every machine, not only where a GPU is.

Set ``engine.sync_debug = "error"`` (or ``"warn"``) before ``fit()``; the
per-epoch reads (epoch loss, non-finite check, validation) happen outside it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moola_engine.errors import MoolaError

# Operators that copy a value (or a data-dependent shape) back to the host on CUDA.
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero", "aten::repeat_interleave",
})


class HostSyncError(MoolaError):
    """An operation that forces a host-device sync ran inside the training step loop."""


# torch leaves TorchDispatchMode.__init_subclass__ and __init__ unannotated (no-untyped-call under --strict)
class _SyncWatch(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, mode: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.mode = mode

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in SYNC_OPS and not _from_optimizer_step_count():
            msg = (f"{name} inside the training step loop: on a GPU this forces a host-device sync "
                   "(read values at epoch end instead, or keep them as device tensors)")
            if self.mode == "error":
                raise HostSyncError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return func(*args, **(kwargs or {}))


_OPTIM_DIR = os.path.join("torch", "optim") + os.sep


def _from_optimizer_step_count() -> bool:
    # torch.optim keeps its step counts in CPU tensors even for CUDA parameters (unless capturable/fused), so
    # reading them is no sync on a GPU; the CPU proxy cannot tell by device, it tells by caller.
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if _OPTIM_DIR in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def sync_guard(device: torch.device, mode: str | None) -> Iterator[None]:
    """Report host-device syncs inside the block: ``mode`` None (off), ``"warn"`` or ``"error"``."""
    if mode is None:
        yield
        return
    if mode not in ("warn", "error"):
        raise MoolaError(f'sync_debug must be None, "warn" or "error", got {mode!r}')
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        with _SyncWatch(mode):
            yield
