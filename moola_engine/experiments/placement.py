"""Where local ablation workers run on CUDA, and how many fit: one GPU per worker, round-robin; jobs from memory.

The decisions are pure functions of a few numbers (tested on made-up figures, no GPU needed); the torch.cuda
queries they need are the small functions at the end, which the tests replace.

* :func:`cuda_targets`: the GPU indices a grid's workers share (``[]``: its cells run on the CPU, nothing changes).
* :func:`worker_devices`: worker i (0 is the ``ablate`` process itself) gets ``targets[i % len(targets)]``.
* :func:`cuda_jobs`: ``ablate`` without ``--jobs`` on CUDA: jobs per GPU =
  min(floor(0.9 x free memory per GPU / memory per task), host cores // GPUs, 16), at least 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import attrs

from moola_engine.errors import ConfigError

MIB = 2**20
GIB = 2**30
CONTEXT_MIB = 500
"""What a worker process's CUDA context takes beyond what its cell's tensors reserve: the allocator's peak does not
count it, and it is about 300-500 MiB per process and GPU with recent drivers and torch (more with lazy-loading off).
The memory-aware default adds it to the measured peak; ``--cell-memory`` replaces the whole estimate."""
MEMORY_FRACTION = 0.9
"""Of a GPU's free memory, the share the default hands out (the rest absorbs fragmentation and cells that peak
higher than the first)."""
MAX_JOBS_PER_GPU = 16


def parse_devices(text: str) -> list[int]:
    """``--devices 0,2`` -> [0, 2]; anything else is a ConfigError naming the flag."""
    parts = [p.strip() for p in text.split(",")]
    if any(re.fullmatch(r"[0-9]{1,4}", p) is None for p in parts):
        raise ConfigError("--devices", f"expected comma-separated GPU indices like 0,1, got {text[:40]!r}")
    out = [int(p) for p in parts]
    if len(set(out)) != len(out):
        raise ConfigError("--devices", f"a GPU is listed twice: {text[:40]}")
    return out


def cuda_targets(device: str, *, gpu_count: int, only: Sequence[int] | None = None) -> list[int]:
    """The GPU indices the grid's local workers share; ``[]`` when its cells do not run on CUDA.

    ``device``: the grid's ``train.device``: ``"auto"`` is CUDA when a GPU is visible, ``"cuda"`` every visible GPU,
    ``"cuda:N"`` GPU N only.  ``only``: ``--devices`` (wins over a ``cuda:N``), each index below ``gpu_count``.
    """
    pinned: int | None = None
    if device == "auto":
        on_cuda = gpu_count > 0
    elif device == "cuda" or device.startswith("cuda:"):
        on_cuda = True
        pinned = int(device.split(":", 1)[1]) if ":" in device else None
    else:
        on_cuda = False
    if only is not None and not on_cuda:
        where = "no CUDA device is visible here" if gpu_count == 0 else f"the cells run on train.device = {device!r}"
        raise ConfigError("--devices", f"{where}; --devices picks the GPUs of a grid whose cells run on CUDA")
    if not on_cuda:
        return []
    if gpu_count == 0:
        raise ConfigError("train.device", f"{device!r} but no CUDA device is visible here (use \"auto\" or \"cpu\")")
    if only is not None:
        if not only:
            raise ConfigError("--devices", "expected at least one GPU index")
        bad = [k for k in only if not 0 <= k < gpu_count]
        if bad:
            raise ConfigError("--devices", f"no GPU {', '.join(map(str, bad))} here: {gpu_count} visible "
                                           f"(indices 0..{gpu_count - 1})")
        return list(only)
    if pinned is not None:
        if pinned >= gpu_count:
            raise ConfigError("train.device", f"{device!r} but only {gpu_count} GPU(s) are visible")
        return [pinned]
    return list(range(gpu_count))


def worker_devices(targets: Sequence[int], jobs: int) -> list[str]:
    """Worker i's device, round-robin: ``cuda:<targets[i % n]>`` (worker 0 is the ``ablate`` process itself)."""
    return [f"cuda:{targets[i % len(targets)]}" for i in range(jobs)] if targets else []


@attrs.frozen(kw_only=True)
class JobsDecision:
    per_gpu: int
    total: int
    limit: str
    """What set ``per_gpu``: ``"memory"``, ``"cores"`` or ``"cap"`` (:data:`MAX_JOBS_PER_GPU`)."""
    line: str
    """The one line ``ablate`` prints, naming the figures."""


def cuda_jobs(*, gpus: int, free_bytes: Sequence[int], task_bytes: int, cores: int, what: str = "cell",
              measured: bool = True) -> JobsDecision:
    """Jobs per GPU = min(floor(0.9 x free / task), cores // gpus, 16), at least 1; ``total`` = per GPU x gpus.

    ``free_bytes``: free memory of each GPU used (the smallest decides, so every GPU takes as many);
    ``task_bytes``: the memory one task (a cell, or a batched group) needs, context included; ``measured``: whether
    it was measured (``about``) or given (``--cell-memory``).
    """
    if gpus < 1 or not free_bytes or task_bytes <= 0:
        raise ValueError(f"cuda_jobs: gpus={gpus}, free_bytes={list(free_bytes)}, task_bytes={task_bytes}")
    free = min(free_bytes)
    by_memory = math.floor(MEMORY_FRACTION * free / task_bytes)
    by_cores = max(1, cores // gpus)
    per_gpu = max(1, min(by_memory, by_cores, MAX_JOBS_PER_GPU))
    if by_memory <= min(by_cores, MAX_JOBS_PER_GPU):
        limit = "memory"
        why = f"{MEMORY_FRACTION:g} x free memory" + (": not even one fits, trying one" if by_memory < 1 else "")
    elif by_cores <= MAX_JOBS_PER_GPU:
        limit, why = "cores", f"capped by {cores} host cores" + (f" over {gpus} GPUs" if gpus > 1 else "")
    else:
        limit, why = "cap", f"capped at {MAX_JOBS_PER_GPU} per GPU"
    free_txt = f"{gib(free)} free" + (" each" if gpus > 1 else "")
    size = f"{'about ' if measured else ''}{gib(task_bytes)} a {what}"
    line = (f"ablate: {gpus} GPU{'s' if gpus > 1 else ''}, {free_txt}, {size} -> {per_gpu} job"
            f"{'s' if per_gpu > 1 else ''} per GPU ({why})")
    return JobsDecision(per_gpu=per_gpu, total=per_gpu * gpus, limit=limit, line=line)


def gib(n: int) -> str:
    """``7.8 GiB``, ``0.6 GiB``: one decimal from 1 GiB up, two significant digits below."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / GIB:.2g} GiB"


# --------------------------------------------------------------------------- torch.cuda (replaced in tests)


def gpu_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_memory(index: int) -> int:
    """Free bytes on GPU ``index`` (``cudaMemGetInfo``; creates this process's context there)."""
    import torch

    free, _total = torch.cuda.mem_get_info(index)
    return int(free)


def reset_peak(device: str) -> None:
    import torch

    torch.cuda.reset_peak_memory_stats(device)


def peak_reserved(device: str) -> int:
    """Bytes the caching allocator reserved at most on ``device`` since :func:`reset_peak`."""
    import torch

    return int(torch.cuda.max_memory_reserved(device))


def release_cached(device: str) -> None:
    """Hand this process's cached, unused blocks back so the free-memory query sees them."""
    import torch

    with torch.cuda.device(device):
        torch.cuda.empty_cache()
