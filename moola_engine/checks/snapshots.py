"""Weight snapshots for the delta checks: exact device copies, or fingerprints for models too big to copy.

Both stores answer the same question for a set of named tensors: did any bit
change since the snapshot, and by how much?  All results stay on the device
as tensors; the caller reads them back in one host sync per check.

``exact``
    A copy of the checked tensors, packed into one flat buffer per dtype and
    device (memory: one more copy of the checked tensors).  ``changed`` compares
    the bit patterns (so -0.0 vs 0.0 and NaN payloads count), ``max_abs_delta``
    and ``||dw|| / ||w||`` are exact.  The snapshot is refreshed in place by the
    comparison (``delta_and_take(..., reuse=True)``): a group under ``SMALL``
    elements is packed into a second buffer set and compared whole-buffer, a
    larger one is compared against the live tensors block by block and copied
    into its own buffers while each block is in the cache.  No interval
    allocates; on the CPU a frozen group above ``SMALL`` costs one bitwise ``memcmp``
    per tensor (:func:`same_bits`) and no copy.

``fingerprint``
    No copy: per chunk of ``CHUNK`` (1024) elements of each tensor, ``CHECKSUMS`` (5) exact integer
    checksums of the bit patterns and ``PROJECTIONS`` (2) ±1 random projections of the values, plus each
    tensor's squared norm; computed on the tensor's device in one blocked pass (two small matrix
    products per block), so memory is about 1.2% of a float32 tensor and no temporary is larger than a
    block.  Trade-offs:

    * a change is detected unless every checksum of its chunk cancels: a single changed element (a sign
      flip, one ulp, a NaN payload, ...) is always caught (non-zero integer weights, exact integer
      arithmetic); several changed elements in one chunk go unnoticed with probability at most
      ``4096**-5 = 2**-60`` per chunk over the draw of the fixed weights (docs/verification.md);
    * ``max_abs_delta`` cannot be known (reported as NaN);
    * ``||dw||`` is estimated from the projections (unbiased for ``||dw||**2``, exact for a change in one
      element per chunk, the error shrinking with the number of chunks that changed); the relative delta
      and the distance from the pretrained weights are flagged ``estimate = true`` in the events.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch

CHUNK = 1024  # elements per fingerprint chunk
CHECKSUMS = 5  # exact integer checksums of the bit patterns per chunk
PROJECTIONS = 2  # ±1 projections of the values per chunk (the ||dw|| estimate)
WEIGHT_MAX = 2048  # checksum weights: uniform on ±1..2048; CHUNK * 2**31 * WEIGHT_MAX = 2**52 < 2**53 (exact)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}

Named = Iterable[tuple[str, torch.Tensor]]


def _load_memcmp() -> Any:
    """libc's ``memcmp`` (None where it cannot be loaded): a bitwise comparison of two CPU buffers at memory speed
    that stops at the first difference; ``torch.equal`` on the CPU compares element by element, 5x slower on
    equal buffers (a frozen group's interval check)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "msvcrt")
        fn = lib.memcmp
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MEMCMP = _load_memcmp()


def same_bits(t: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors of the same shape hold the same bit patterns (so -0.0 != 0.0, NaN payloads count)."""
    if (_MEMCMP is not None and t.device.type == "cpu" and b.device.type == "cpu" and t.dtype == b.dtype
            and t.shape == b.shape and t.is_contiguous() and b.is_contiguous()):
        n = t.numel() * t.element_size()
        return n == 0 or _MEMCMP(t.data_ptr(), b.data_ptr(), n) == 0
    return torch.equal(bits(t), bits(b))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as an integer tensor (integers and bools as they are)."""
    t = t.detach()
    if t.is_floating_point():
        return t.contiguous().view(_BITS[t.element_size()])
    return t


class Delta:
    """Device scalars for one set of tensors: changed (bool), max |dw| (NaN in fingerprint mode), ||dw||², ||w0||².

    :meth:`host` makes one from Python floats instead (the CPU path, where reading a value costs nothing):
    then :meth:`as_list` needs no tensor operation at all.
    """

    host_values: list[float] | None = None
    against_sq: float | None = None
    """||now - against||² when the comparison was asked to measure it in the same pass (host path only)."""

    def __init__(self, device: torch.device) -> None:
        z = torch.zeros((), dtype=torch.float64, device=device)
        self.device = device
        self.changed = torch.zeros((), dtype=torch.bool, device=device)
        self.max_abs = z.clone()
        self.diff_sq = z.clone()
        self.ref_sq = z.clone()

    @classmethod
    def host(cls, device: torch.device, changed: bool, max_abs: float, diff_sq: float, ref_sq: float) -> Delta:
        out = cls.__new__(cls)
        out.device = device
        norm = math.sqrt(diff_sq)
        out.host_values = [float(changed), max_abs, norm, norm / max(math.sqrt(ref_sq), 1e-30)]
        return out

    def as_tensor(self) -> torch.Tensor:
        """[changed, max_abs, ||dw||, ||dw|| / ||w0||] as one float64 tensor (read back with one sync)."""
        if self.host_values is not None:
            return torch.tensor(self.host_values, dtype=torch.float64, device=self.device)
        norm = self.diff_sq.sqrt()
        rel = norm / self.ref_sq.sqrt().clamp_min(1e-30)
        return torch.stack([self.changed.double(), self.max_abs, norm, rel])

    def as_list(self) -> list[float]:
        """The same four numbers as Python floats (a host sync unless they are host values already)."""
        return list(self.host_values) if self.host_values is not None else self.as_tensor().tolist()


class Store(Protocol):
    mode: str
    estimate: bool

    def take(self, named: Named) -> Any: ...

    def delta(self, snap: Any, named: Named, device: torch.device) -> Delta: ...

    def delta_and_take(self, snap: Any, named: Named, device: torch.device, reuse: bool = False,
                       against: Any = None) -> tuple[Delta, Any]:
        """``delta`` plus a snapshot of ``named`` as it is now (what ``take`` would return), in one pass;
        ``against``: a second snapshot to measure ``||now - it||²`` to in the same pass, where the store can."""
        ...


class FlatSnapshot:
    """Copies of a set of named tensors, packed into one flat buffer per dtype and device.

    One ``torch.cat`` takes the copy when the snapshot is created; after that the exact store
    refreshes it in place (``copy_`` into the same buffers, see :meth:`ExactStore.delta_and_take`
    with ``reuse=True``), so a check interval allocates nothing.  ``views`` gives each tensor back
    (views into the buffers, built once).
    """

    __slots__ = ("_spare", "_views", "buffers", "keys", "names", "shapes")

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.names = [n for n, _ in named]
        self.shapes = [t.shape for _, t in named]
        self.keys = [_bucket(t) for _, t in named]
        self.buffers = _pack(named, self.keys)
        self._views: dict[str, torch.Tensor] | None = None
        self._spare: dict[tuple[Any, ...], torch.Tensor] | None = None  # small groups: the second buffer set

    @classmethod
    def referring(cls, named: list[tuple[str, torch.Tensor]]) -> FlatSnapshot:
        """A snapshot that is the given tensors themselves (no copy): for tensors nothing writes to."""
        out = cls.__new__(cls)
        out.names = [n for n, _ in named]
        out.shapes = [t.shape for _, t in named]
        out.keys = [_bucket(t) for _, t in named]
        out.buffers = {}
        out._views = {n: t.detach() for n, t in named}
        out._spare = None
        return out

    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def refill(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Swap in the spare buffers holding ``named`` as it is now (the old ones become the spare)."""
        spare = self._spare
        if spare is None:
            spare = {k: torch.empty_like(b) for k, b in self.buffers.items()}
        parts: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for (_, t), key in zip(named, self.keys, strict=True):
            parts.setdefault(key, []).append(t.detach().reshape(-1))
        for key, ts in parts.items():
            torch.cat(ts, out=spare[key])
        self._spare, self.buffers, self._views = self.buffers, spare, None

    def views(self) -> dict[str, torch.Tensor]:
        if self._views is None:
            offsets: dict[tuple[Any, ...], int] = {}
            out = {}
            for name, shape, key in zip(self.names, self.shapes, self.keys, strict=True):
                start = offsets.get(key, 0)
                numel = shape.numel()
                out[name] = self.buffers[key][start:start + numel].view(shape)
                offsets[key] = start + numel
            self._views = out
        return self._views

    def same_layout(self, named: list[tuple[str, torch.Tensor]]) -> bool:
        """True when ``named`` has this snapshot's names, shapes, dtypes and devices, in this order."""
        return (len(named) == len(self.names)
                and all(n == m and t.shape == s and _bucket(t) == k
                        for (n, t), m, s, k in zip(named, self.names, self.shapes, self.keys, strict=True)))


def _bucket(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, t.device)


def _pack(named: list[tuple[str, torch.Tensor]], keys: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], torch.Tensor]:
    """One flat copy per (dtype, device): ``torch.cat`` of the flattened tensors (always a new tensor)."""
    parts: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for (_, t), key in zip(named, keys, strict=True):
        parts.setdefault(key, []).append(t.detach().reshape(-1))
    return {key: torch.cat(ts) for key, ts in parts.items()}


SMALL = 1 << 20  # elements: below this a group is compared whole-buffer (a spare copy), above it block by block


def _block_size(device: torch.device) -> int:
    """Elements per block of a blocked pass: on the CPU a block's temporaries stay in the cache, so the
    subtraction, the two reductions and the copy of a block read memory once; on an accelerator larger
    blocks keep the kernel launches few."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


def _fingerprint_block(device: torch.device) -> int:
    """Elements per block of a fingerprint pass: 256K on the CPU (the matrix products run better on larger
    blocks than the exact store's element-wise passes do: a light pass of 16M elements took 12 ms with 256K
    blocks and 17 ms with 64K, in-process), the exact store's block size on an accelerator."""
    return 1 << 18 if device.type == "cpu" else _block_size(device)


def _slices(numel: int, block: int) -> Iterable[slice]:
    return (slice(i, min(i + block, numel)) for i in range(0, numel, block))


class Scratch:
    """One reused buffer per (dtype, device) for the differences a host-path comparison computes: no
    allocation per comparison (a fresh buffer of a few MB costs page faults on every use)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like`` (its dtype, or float64 for types narrower than 4 bytes)."""
        dtype = like.dtype if like.element_size() >= 4 else torch.float64
        key = (dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self.buffers[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buf[:like.numel()].view(like.shape)


def _diff(t: torch.Tensor, b: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    """``t - b`` of two floating tensors (in float64 for types narrower than 4 bytes), into ``scratch``."""
    if scratch is None:
        return t - b if t.element_size() >= 4 else t.double() - b.double()
    d = scratch.get(t)
    if t.element_size() >= 4:
        return torch.sub(t, b, out=d)
    d.copy_(t)
    return d.sub_(b)


def _against_sq(now: FlatSnapshot, against: FlatSnapshot, scratch: Scratch) -> float:
    """||now - against||² over ``against``'s names (floating tensors), read on the host."""
    if (against.buffers and against.names == now.names and against.shapes == now.shapes
            and against.keys == now.keys):  # the same layout: whole-buffer
        pairs = [(now.buffers[k], against.buffers[k]) for k in now.buffers]
    else:
        nv, av = now.views(), against.views()
        pairs = [(nv[n], av[n]) for n in against.names]
    total = 0.0
    for t, a in pairs:
        if t.is_floating_point() and t.numel():
            total += float(torch.linalg.vector_norm(_diff(t, a, scratch))) ** 2
    return total


class ExactStore:
    mode = "exact"
    estimate = False

    def __init__(self, host_reads: bool | None = None) -> None:
        self.host_reads = host_reads  # None: host reads when everything is on the CPU (see _compare)
        self.scratch = Scratch()

    @torch.no_grad()
    def take(self, named: Named) -> FlatSnapshot:
        return FlatSnapshot(list(named))

    def refer(self, named: Named) -> FlatSnapshot:
        """A snapshot of tensors that never change (the pretrained weights as loaded): they are the snapshot,
        no copy.  Only for :meth:`delta` (``delta_and_take`` would refresh it in place)."""
        return FlatSnapshot.referring(list(named))

    @torch.no_grad()
    def delta(self, snap: FlatSnapshot, named: Named, device: torch.device) -> Delta:
        """The change of ``named`` since ``snap``; reads the tensors where they are (no copy), ``snap`` unchanged."""
        named = list(named)
        if not snap.same_layout(named):
            before = snap.views()
            return _compare([(t, before[n]) for n, t in named], device, self.host_reads, self.scratch)
        if snap.buffers and snap.numel() < SMALL:  # a few whole-buffer operations beat per-tensor dispatch
            if _unchanged_on_host(named, snap, device, self.host_reads):
                return Delta.host(device, False, 0.0, 0.0, 0.0)  # bitwise equal: no copy, no arithmetic
            now = FlatSnapshot(named)
            return _compare([(now.buffers[k], snap.buffers[k]) for k in now.buffers], device, self.host_reads,
                            self.scratch)
        return _compare_live(named, snap, device, self.host_reads, update=False, scratch=self.scratch)

    @torch.no_grad()
    def delta_and_take(self, snap: FlatSnapshot, named: Named, device: torch.device,
                       reuse: bool = False, against: FlatSnapshot | None = None) -> tuple[Delta, FlatSnapshot]:
        """The change since ``snap`` and a snapshot of ``named`` as it is now.

        ``reuse=True`` (the caller gives ``snap`` up): the comparison copies each changed tensor into
        ``snap``'s own buffers, block by block while the block is in the cache, and returns ``snap``
        itself, now the snapshot of the present; nothing is allocated.  Otherwise a new snapshot is made.
        ``against`` (with ``reuse``, on the host path): a snapshot of some of the same names (the pretrained
        weights); when the group moved, the same pass also measures ``||now - against||²`` into
        ``Delta.against_sq`` while each tensor is in the cache (None when it was not measured).
        """
        named = list(named)
        if not snap.same_layout(named):
            # a different set of tensors: compare name by name (a name missing from the snapshot is a KeyError)
            now = FlatSnapshot(named)
            before, after = snap.views(), now.views()
            return _compare([(after[n], before[n]) for n in now.names], device, self.host_reads, self.scratch), now
        if reuse and snap.numel() < SMALL:
            # a small group: packed into the snapshot's second buffer set (one torch.cat(out=) per dtype, no
            # allocation after the first time), compared whole-buffer, and swapped in
            old = snap.buffers
            snap.refill(named)
            delta = _compare([(snap.buffers[k], old[k]) for k in old], device, self.host_reads, self.scratch)
            if against is not None and delta.host_values is not None and delta.host_values[0]:
                delta.against_sq = _against_sq(snap, against, self.scratch)
            return delta, snap
        if reuse:
            views = against.views() if against is not None else None
            return _compare_live(named, snap, device, self.host_reads, update=True, scratch=self.scratch,
                                 against=views), snap
        # ``snap`` is kept elsewhere (a phase's start): a new snapshot of now, unless nothing changed
        if self.host_reads is not False and device.type == "cpu" and snap.numel() >= SMALL:
            delta = _compare_live(named, snap, device, self.host_reads, update=False, scratch=self.scratch,
                                  against=against.views() if against is not None else None)
            if delta.host_values is not None and not delta.host_values[0]:
                return delta, snap  # unchanged: ``snap`` is a snapshot of now already (shared: no copy)
            return delta, FlatSnapshot(named)
        if _unchanged_on_host(named, snap, device, self.host_reads):
            return Delta.host(device, False, 0.0, 0.0, 0.0), snap  # keep sharing ``snap``: no copy
        now = FlatSnapshot(named)
        delta = _compare([(now.buffers[k], snap.buffers[k]) for k in now.buffers], device, self.host_reads,
                         self.scratch)
        if delta.host_values is not None and not delta.host_values[0]:
            return delta, snap  # unchanged: keep sharing ``snap`` (one snapshot object while a group is frozen)
        if against is not None and delta.host_values is not None:
            delta.against_sq = _against_sq(now, against, self.scratch)
        return delta, now


def _unchanged_on_host(named: list[tuple[str, torch.Tensor]], snap: FlatSnapshot, device: torch.device,
                       host_reads: bool | None) -> bool:
    """True when, on the host path (``host_reads``, by default: everything on the CPU), every tensor of ``named``
    is bitwise ``snap``'s: one ``memcmp`` per tensor, before any copy is packed (a frozen group costs no copy)."""
    if host_reads is False or device.type != "cpu":
        return False
    views = snap.views()
    pairs = [(t.detach(), views[n]) for n, t in named if t.numel()]
    moved = _moved_on_host(pairs, device, host_reads)
    return moved is not None and not moved


def _moved_on_host(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   host_reads: bool | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (now, before) pairs whose bits differ, when the comparison reads values on the host (``host_reads``;
    by default when everything is on the CPU, where a host read costs nothing): one bitwise ``torch.equal`` per
    tensor, which stops at the first difference.  None: compare on the device.  No pairs: nothing moved."""
    if not pairs:
        return []
    if host_reads is None:
        host_reads = device.type == "cpu" and all(t.device.type == "cpu" for t, _ in pairs)
    if not host_reads:
        return None
    return [(t, b) for t, b in pairs if not same_bits(t, b)]


def _moved_delta(device: torch.device, maxima: list[float], diff_sq: float, ref_sq: float) -> Delta:
    """A host-read Delta of tensors that moved: the largest of ``maxima`` (NaN wins, as ``torch.amax``)."""
    max_abs = math.nan if any(math.isnan(v) for v in maxima) else max(maxima)
    return Delta.host(device, True, max_abs, diff_sq, ref_sq)


def _compare_live(named: list[tuple[str, torch.Tensor]], snap: FlatSnapshot, device: torch.device,
                  host_reads: bool | None, update: bool, scratch: Scratch | None = None,
                  against: dict[str, torch.Tensor] | None = None) -> Delta:
    """``_compare`` of the live tensors against ``snap``'s views, block by block; ``update``: copy them into it.
    ``against`` (host path): views of another snapshot (the pretrained weights) to measure ||now - against||²
    against in the same pass, while each block is in the cache (``Delta.against_sq``)."""
    views = snap.views()
    triples = [(n, t.detach(), views[n]) for n, t in named if t.numel()]
    pairs = [(t, b) for _, t, b in triples]
    moved = _moved_on_host(pairs, device, host_reads)  # a frozen group: no arithmetic, no copy
    if moved is not None and not moved:
        return Delta.host(device, False, 0.0, 0.0, 0.0)
    if moved is not None:
        maxima: list[float] = []
        diff_sq = ref_sq = 0.0
        against_sq = 0.0 if against is not None else None
        moved_ids = {id(b) for _, b in moved}
        block = _block_size(device)
        for name, t, b in triples:
            a = against.get(name) if against is not None and t.is_floating_point() else None
            if id(b) not in moved_ids:
                if t.is_floating_point():
                    ref_sq += float(torch.linalg.vector_norm(b)) ** 2
                if a is not None and against_sq is not None:  # block by block: no temporary above a block
                    flat, pre = t.reshape(-1), a.reshape(-1)
                    for s in _slices(flat.numel(), block):
                        against_sq += float(torch.linalg.vector_norm(_diff(flat[s], pre[s], scratch))) ** 2
                continue
            tf, bf = t.reshape(-1), b.view(-1)
            af = a.reshape(-1) if a is not None else None
            for s in _slices(tf.numel(), block):
                tb, bb = tf[s], bf[s]
                if t.is_floating_point():
                    d = _diff(tb, bb, scratch)  # one reused buffer for every block
                    maxima += [abs(float(d.amin())), abs(float(d.amax()))]  # abs: never a -0.0 in the events
                    diff_sq += float(torch.linalg.vector_norm(d)) ** 2
                    ref_sq += float(torch.linalg.vector_norm(bb)) ** 2
                    if af is not None and against_sq is not None:  # the live block is in the cache: reuse d
                        against_sq += float(torch.linalg.vector_norm(_diff(tb, af[s], scratch))) ** 2
                else:
                    maxima.append(float((tb.double() - bb.double()).abs().amax()))
                if update:
                    bb.copy_(tb)
        out = _moved_delta(device, maxima, diff_sq, ref_sq)
        out.against_sq = against_sq
        return out
    # on an accelerator: device-side reductions only, read back later in the check's one sync
    out = Delta(device)
    changed, maxes, diff_sq_t, ref_sq_t = [], [], [], []
    for t, b in pairs:
        tf, bf = t.reshape(-1), b.view(-1)
        for s in _slices(tf.numel(), _block_size(t.device)):
            tb, bb = tf[s], bf[s]
            changed.append((bits(tb) != bits(bb)).any().to(device))
            if t.is_floating_point():
                d = tb - bb if t.element_size() >= 4 else tb.double() - bb.double()
                maxes.append(d.abs().amax().double().to(device))
                diff_sq_t.append(torch.linalg.vector_norm(d).double().square().to(device))
                ref_sq_t.append(torch.linalg.vector_norm(bb).double().square().to(device))
            else:
                maxes.append((tb.double() - bb.double()).abs().amax().to(device))
            if update:
                bb.copy_(tb)
    out.changed = torch.stack(changed).any()
    out.max_abs = torch.stack(maxes).amax()
    if diff_sq_t:
        out.diff_sq = torch.stack(diff_sq_t).sum()
        out.ref_sq = torch.stack(ref_sq_t).sum()
    return out


def _compare(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             host_reads: bool | None = None, scratch: Scratch | None = None) -> Delta:
    """Bitwise change, max |dw|, ||dw||² and ||w0||² over (now, before) pairs of equal-shaped tensors.

    ``host_reads`` (default: when everything is on the CPU) lets the comparison read values on the host;
    otherwise it uses device-side reductions only.  Both give the same numbers (tests/test_snapshots.py).
    """
    pairs = [(t, b) for t, b in pairs if t.numel()]
    moved = _moved_on_host(pairs, device, host_reads)
    if moved is not None and not moved:
        return Delta.host(device, False, 0.0, 0.0, 0.0)
    if moved is not None:
        # arithmetic only for the buffers that changed (the frozen groups need none), and the results as
        # Python floats (no scalar tensors to build and stack)
        maxima: list[float] = []
        diff_sq = ref_sq = 0.0
        for t, b in moved:
            if t.is_floating_point():
                d = _diff(t, b, scratch)
                maxima += [abs(float(d.amin())), abs(float(d.amax()))]  # no |d| tensor; abs: never a -0.0
                diff_sq += float(torch.linalg.vector_norm(d)) ** 2
            else:
                maxima.append(float((t.double() - b.double()).abs().amax()))
        for t, b in pairs:
            if t.is_floating_point():
                ref_sq += float(torch.linalg.vector_norm(b)) ** 2
        return _moved_delta(device, maxima, diff_sq, ref_sq)
    # on an accelerator: device-side reductions only, read back later in the check's one sync
    out = Delta(device)
    # exact: any differing bit pattern (catches -0.0 vs 0.0 and NaN payloads that a float compare misses)
    changed = [(bits(t) != bits(b)).any().to(device) for t, b in pairs]
    out.changed = changed[0] if len(changed) == 1 else torch.stack(changed).any()
    maxes, diff_sq_t = [], []
    for t, b in pairs:
        if t.is_floating_point():
            d = t - b if t.element_size() >= 4 else t.double() - b.double()
            maxes.append(d.abs().amax().double().to(device))
            diff_sq_t.append(torch.linalg.vector_norm(d).double().square().to(device))
        else:
            maxes.append((t.double() - b.double()).abs().amax().to(device))
    ref_sq_t = [torch.linalg.vector_norm(b).double().square().to(device) for t, b in pairs if t.is_floating_point()]
    out.max_abs = maxes[0] if len(maxes) == 1 else torch.stack(maxes).amax()
    if diff_sq_t:
        out.diff_sq = diff_sq_t[0] if len(diff_sq_t) == 1 else torch.stack(diff_sq_t).sum()
    if ref_sq_t:
        out.ref_sq = ref_sq_t[0] if len(ref_sq_t) == 1 else torch.stack(ref_sq_t).sum()
    return out


class Fingerprint:
    """One tensor's fingerprint: per chunk of ``CHUNK`` elements, ``CHECKSUMS`` exact integer checksums of
    the bit patterns (float64 holding integers; None in a light fingerprint), the sum of its 32-bit words
    modulo 2**32 (int32, wrapping) and ``PROJECTIONS`` ±1 projections of the values; and the tensor's
    squared norm (a device scalar)."""

    __slots__ = ("checks", "proj", "sq", "sums")

    def __init__(self, checks: torch.Tensor | None, proj: torch.Tensor, sq: torch.Tensor,
                 sums: torch.Tensor) -> None:
        self.checks, self.proj, self.sq, self.sums = checks, proj, sq, sums

    @property
    def light(self) -> bool:
        return self.checks is None


class FingerprintStore:
    """Chunked fingerprints: a small fixed number of numbers per chunk of ``CHUNK`` elements, no copy.

    Each tensor is read once per fingerprint, block by block (a block's temporaries stay in the CPU
    cache), on its own device: its bit patterns as integers (32-bit words; 8-byte types as two words)
    go through one float64 matrix product with ``CHECKSUMS`` columns of fixed random integer weights,
    and its values through one product with ``PROJECTIONS`` columns of fixed random signs.  The
    weights are small enough that every partial sum is an integer below 2**53, so the checksums are
    exact: equal bits always give equal checksums, and a single changed element (weight != 0) always
    changes them.  See docs/verification.md for the bound on several changes.
    """

    mode = "fingerprint"
    estimate = True

    def __init__(self, seed: int = 20251125) -> None:
        self.seed = seed
        self._weights: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def weights(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(CHECKSUMS x CHUNK float64 integer weights, PROJECTIONS x CHUNK signs in ``dtype``) on ``device``."""
        key = (device, dtype)
        if key not in self._weights:
            g = torch.Generator().manual_seed(self.seed)  # drawn on the CPU: the same weights on every device
            w = torch.randint(1, WEIGHT_MAX + 1, (CHECKSUMS, CHUNK), generator=g, dtype=torch.int64)
            sign = torch.randint(0, 2, (CHECKSUMS, CHUNK), generator=g, dtype=torch.int64) * 2 - 1
            s = torch.randint(0, 2, (PROJECTIONS, CHUNK), generator=g, dtype=torch.int64) * 2 - 1
            self._weights[key] = ((w * sign).double().to(device), s.to(dtype).to(device))
        return self._weights[key]

    @torch.no_grad()
    def fingerprint(self, t: torch.Tensor, light: bool = False) -> Fingerprint:
        """One tensor's fingerprint: checksums (CHECKSUMS x chunks), wrapping word sums (chunks), projections
        (PROJECTIONS x chunks), norm².  ``light``: no checksums (about 3x cheaper; see :meth:`compare`)."""
        t = t.detach()
        dev = t.device
        words = _words(t)
        values = t.reshape(-1) if t.is_floating_point() and t.numel() else None
        vdtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        w, s = self.weights(dev, vdtype)
        rows = max(1, _fingerprint_block(dev) // CHUNK)  # on the CPU 256 chunks per block: a 2 MB float64 block
        # (weights) @ (block)^T: the small matrix on the left is about twice as fast as block @ weights
        # the words of a block are converted into one reused float64 buffer: no allocation per block (freed
        # blocks of a few MB otherwise pile up in the allocator and show in the process's peak memory)
        scratch = self._scratch.get(dev)
        if scratch is None or scratch.shape[0] < rows:
            scratch = self._scratch[dev] = torch.empty(rows, CHUNK, dtype=torch.float64, device=dev)
        checks: list[torch.Tensor] = []
        sums: list[torch.Tensor] = []
        for x, c in _chunked(words, rows):
            # the words' sum modulo 2**32: integer addition, so the same result in any order on any device
            sums.append(x.sum(1, dtype=torch.int32))
            if not light:
                block = scratch[:x.shape[0], :c]
                block.copy_(x)
                checks.append(w[:, :c] @ block.t())
        proj: list[torch.Tensor] = []
        sq: list[torch.Tensor] = []
        if values is not None:
            for x, c in _chunked(values, rows):
                x = x.to(vdtype)
                proj.append(s[:, :c] @ x.t())
                sq.append(torch.linalg.vector_norm(x).double().square())
        return Fingerprint(
            None if light else
            torch.cat(checks, 1) if checks else torch.zeros(CHECKSUMS, 0, dtype=torch.float64, device=dev),
            torch.cat(proj, 1).double() if proj else torch.zeros(PROJECTIONS, 0, dtype=torch.float64, device=dev),
            torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64, device=dev),
            torch.cat(sums) if sums else torch.zeros(0, dtype=torch.int32, device=dev))

    def take(self, named: Named, light: bool = False) -> dict[str, Fingerprint]:
        """Fingerprints of ``named``; ``light``: without the checksums, for a group expected to move (see
        :meth:`compare`)."""
        return {n: self.fingerprint(t, light) for n, t in named}

    def delta(self, snap: dict[str, Fingerprint], named: Named, device: torch.device) -> Delta:
        return self.delta_and_take(snap, named, device)[0]

    def delta_and_take(self, snap: dict[str, Fingerprint], named: Named, device: torch.device,
                       reuse: bool = False, against: Any = None) -> tuple[Delta, dict[str, Fingerprint]]:
        """One pass over ``named``: its fingerprints now, and the change since ``snap`` (``reuse``: no effect,
        a fingerprint is a few numbers; ``against``: not measured, the distance comes from the fingerprints)."""
        now = {n: self.fingerprint(t) for n, t in named}
        return self.compare(snap, now, device), now

    def compare(self, before: dict[str, Fingerprint], after: dict[str, Fingerprint], device: torch.device) -> Delta:
        """The change between two fingerprint snapshots, without reading any tensor (names of ``after``; a name
        missing from ``before`` is a KeyError).

        ``changed`` compares the checksums when both fingerprints have them, else (one is light) the wrapping
        word sums: a changed sum proves a changed bit in any order of summation on any device, and a change
        whose sums all cancel reads as unchanged.  The checks use light fingerprints only on both sides of an
        interval a group trains through (expected to move: such a cancellation fails the check, never passes
        it); every interval that starts or ends frozen is compared by the checksums (docs/verification.md)."""
        out = Delta(device)
        out.max_abs = torch.full((), float("nan"), dtype=torch.float64, device=device)
        changed, diff_sq, ref_sq = [], [], []
        for n, f1 in after.items():
            f0 = before[n]
            if f1.checks is not None and f0.checks is not None:
                changed.append((f1.checks != f0.checks).any().to(device))
            else:
                changed.append((f1.sums != f0.sums).any().to(device))
            if f1.proj.numel():
                dp = f1.proj - f0.proj
                diff_sq.append(((dp * dp).sum() / PROJECTIONS).to(device))  # unbiased for ||dw||² (±1 signs)
                ref_sq.append(f0.sq.to(device))
        if changed:
            out.changed = torch.stack(changed).any()
        if diff_sq:
            out.diff_sq = torch.stack(diff_sq).sum()
            out.ref_sq = torch.stack(ref_sq).sum()
        return out


def _chunked(flat: torch.Tensor, rows: int) -> Iterable[tuple[torch.Tensor, int]]:
    """``flat`` as (block, chunk length) pairs: blocks of up to ``rows`` full chunks (rows x CHUNK views), then
    the partial last chunk as a 1 x c view."""
    n = flat.numel()
    full = n // CHUNK
    for i in range(0, full, rows):
        j = min(i + rows, full)
        yield flat[i * CHUNK:j * CHUNK].view(j - i, CHUNK), CHUNK
    if n > full * CHUNK:
        yield flat[full * CHUNK:].view(1, n - full * CHUNK), n - full * CHUNK


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat integer tensor whose values are at most 2**31 in magnitude: types of 4 bytes
    or more as int32 words (an 8-byte element is two words), 2-byte types as int16, 1-byte types as they are."""
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    size = flat.element_size()
    if size >= 4:
        return flat if flat.dtype == torch.int32 else flat.view(torch.int32)
    if size == 2:
        return flat if flat.dtype == torch.int16 else flat.view(torch.int16)
    return flat if flat.dtype in (torch.uint8, torch.int8) else flat.view(torch.uint8)


def hash_name(name: str) -> int:
    """A stable (process-independent) hash of a tensor name."""
    h = 1469598103934665603
    for ch in name.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h % (2**31)


def make_store(mode: str) -> Store:
    if mode == "fingerprint":
        return FingerprintStore()
    return ExactStore()
