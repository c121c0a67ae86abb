"""Weight snapshots for the delta checks: exact device copies, or fingerprints for models too big to copy.

Both stores answer the same question for a set of named tensors: did any bit
change since the snapshot, and by how much?  All results stay on the device
as tensors; the caller reads them back in one host sync per check.

``exact``
    A copy of the checked tensors, packed into one flat buffer per dtype and
    device (memory: one more copy of the checked tensors).  ``changed`` compares
    the bit patterns (so -0.0 vs 0.0 and NaN payloads count), ``max_abs_delta``
    and ``||dw|| / ||w||`` are exact.  The copy taken to compare is kept as the
    next snapshot (``delta_and_take``), so a check interval costs one copy.

``fingerprint``
    Per tensor a few numbers instead of a copy: two modular checksums of the
    bit patterns under fixed random weights, the squared norm, and
    ``PROJECTIONS`` fixed Gaussian random projections.  Memory is constant per
    tensor (temporary work memory is one tensor's size while a fingerprint is
    computed).  Trade-offs:

    * a change is detected unless it is invisible to both checksums: a single
      changed element is always caught (the checksum weights are non-zero
      modulo a prime and the bit difference of one element is not a multiple
      of both primes); several changes cancel in both checksums with
      probability about 2**-62;
    * ``max_abs_delta`` cannot be known (reported as NaN);
    * ``||dw||`` is a Johnson-Lindenstrauss estimate from the projections
      (unbiased for ``||dw||**2``; with 8 projections typically within ±50%),
      so the relative delta and the distance from the pretrained weights are
      estimates, flagged ``estimate = true`` in the events;
    * regenerating the random weights costs compute at each check (checks run
      per epoch and per transition only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch

PROJECTIONS = 8
_PRIMES = (2_147_483_647, 2_147_483_629)  # below 2**31: products of two residues fit in int64
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}

Named = Iterable[tuple[str, torch.Tensor]]


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

    def delta_and_take(self, snap: Any, named: Named, device: torch.device) -> tuple[Delta, Any]:
        """``delta`` plus a snapshot of ``named`` as it is now (what ``take`` would return), in one pass."""
        ...


class FlatSnapshot:
    """Copies of a set of named tensors, packed into one flat buffer per dtype and device.

    One ``torch.cat`` takes the copy, and the comparison runs a handful of whole-buffer operations
    instead of several per tensor: on a small model the per-tensor dispatch was most of the check's
    cost.  ``views`` gives each tensor back (views into the buffers) for the rare call whose set of
    names differs from the snapshot's.
    """

    __slots__ = ("buffers", "keys", "names", "shapes")

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.names = [n for n, _ in named]
        self.shapes = [t.shape for _, t in named]
        self.keys = [_bucket(t) for _, t in named]
        self.buffers = _pack(named, self.keys)

    def views(self) -> dict[str, torch.Tensor]:
        offsets: dict[tuple[Any, ...], int] = {}
        out = {}
        for name, shape, key in zip(self.names, self.shapes, self.keys, strict=True):
            start = offsets.get(key, 0)
            numel = shape.numel()
            out[name] = self.buffers[key][start:start + numel].view(shape)
            offsets[key] = start + numel
        return out


def _bucket(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, t.device)


def _pack(named: list[tuple[str, torch.Tensor]], keys: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], torch.Tensor]:
    """One flat copy per (dtype, device): ``torch.cat`` of the flattened tensors (always a new tensor)."""
    parts: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for (_, t), key in zip(named, keys, strict=True):
        parts.setdefault(key, []).append(t.detach().reshape(-1))
    return {key: torch.cat(ts) for key, ts in parts.items()}


class ExactStore:
    mode = "exact"
    estimate = False

    def __init__(self, host_reads: bool | None = None) -> None:
        self.host_reads = host_reads  # None: host reads when everything is on the CPU (see _compare)

    @torch.no_grad()
    def take(self, named: Named) -> FlatSnapshot:
        return FlatSnapshot(list(named))

    @torch.no_grad()
    def delta(self, snap: FlatSnapshot, named: Named, device: torch.device) -> Delta:
        return self.delta_and_take(snap, named, device)[0]

    @torch.no_grad()
    def delta_and_take(self, snap: FlatSnapshot, named: Named, device: torch.device) -> tuple[Delta, FlatSnapshot]:
        """The change since ``snap`` and a new snapshot of ``named`` (the copy the comparison made anyway)."""
        named = list(named)
        now = FlatSnapshot(named)
        if (now.names, now.shapes, now.keys) != (snap.names, snap.shapes, snap.keys):
            # a different set of tensors: compare name by name (a name missing from the snapshot is a KeyError)
            before, after = snap.views(), now.views()
            return _compare([(after[n], before[n]) for n in now.names], device, self.host_reads), now
        return _compare([(now.buffers[k], snap.buffers[k]) for k in now.buffers], device, self.host_reads), now


def _compare(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             host_reads: bool | None = None) -> Delta:
    """Bitwise change, max |dw|, ||dw||² and ||w0||² over (now, before) pairs of equal-shaped tensors.

    ``host_reads`` (default: when everything is on the CPU) lets the comparison read values on the host;
    otherwise it uses device-side reductions only.  Both give the same numbers (tests/test_snapshots.py).
    """
    pairs = [(t, b) for t, b in pairs if t.numel()]
    if not pairs:
        return Delta.host(device, False, 0.0, 0.0, 0.0)
    if host_reads is None:
        host_reads = device.type == "cpu" and all(t.device.type == "cpu" for t, _ in pairs)
    if host_reads:
        # A host read costs nothing on the CPU: one bitwise torch.equal per buffer (it stops at the first
        # difference), arithmetic only for the buffers that changed (the frozen groups need none), and the
        # results as Python floats (no scalar tensors to build and stack).
        moved = [(t, b) for t, b in pairs if not torch.equal(bits(t), bits(b))]
        if not moved:
            return Delta.host(device, False, 0.0, 0.0, 0.0)
        maxima: list[float] = []
        diff_sq = ref_sq = 0.0
        for t, b in moved:
            if t.is_floating_point():
                d = t - b if t.element_size() >= 4 else t.double() - b.double()
                lo, hi = torch.aminmax(d)  # max |d| in one pass, no |d| tensor
                maxima += [abs(float(lo)), abs(float(hi))]  # abs: never a -0.0 in the events
                diff_sq += float(torch.linalg.vector_norm(d)) ** 2
            else:
                maxima.append(float((t.double() - b.double()).abs().amax()))
        for t, b in pairs:
            if t.is_floating_point():
                ref_sq += float(torch.linalg.vector_norm(b)) ** 2
        max_abs = math.nan if any(math.isnan(v) for v in maxima) else max(maxima)  # NaN wins, as torch.amax
        return Delta.host(device, True, max_abs, diff_sq, ref_sq)
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


class FingerprintStore:
    mode = "fingerprint"
    estimate = True

    def __init__(self, seed: int = 20251125) -> None:
        self.seed = seed

    def _gen(self, device: torch.device, name: str, salt: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + hash_name(name) * 31 + salt) % (2**62))
        return g

    @torch.no_grad()
    def fingerprint(self, name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 checksums [2], float64 [norm², projections...]) of one tensor."""
        dev = t.device
        flat = bits(t).reshape(-1).long()
        sums = []
        for i, p in enumerate(_PRIMES):
            w = torch.randint(1, p, flat.shape, generator=self._gen(dev, name, i), device=dev, dtype=torch.int64)
            sums.append(((torch.remainder(flat, p) * w) % p).sum() % p)
        checks = torch.stack(sums)
        x = t.detach().reshape(-1).double()
        if not t.is_floating_point():
            return checks, torch.zeros(1 + PROJECTIONS, dtype=torch.float64, device=dev)
        g = self._gen(dev, name, 99)
        proj = [(torch.randn(x.shape, generator=g, device=dev, dtype=torch.float64) * x).sum() for _ in range(PROJECTIONS)]
        return checks, torch.stack([(x * x).sum(), *proj])

    def take(self, named: Named) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: self.fingerprint(n, t) for n, t in named}

    def delta(self, snap: dict[str, tuple[torch.Tensor, torch.Tensor]], named: Named, device: torch.device) -> Delta:
        return self.delta_and_take(snap, named, device)[0]

    def delta_and_take(self, snap: dict[str, tuple[torch.Tensor, torch.Tensor]], named: Named,
                       device: torch.device) -> tuple[Delta, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        out = Delta(device)
        out.max_abs = torch.full((), float("nan"), dtype=torch.float64, device=device)
        now = {}
        for n, t in named:
            c0, f0 = snap[n]
            c1, f1 = now[n] = self.fingerprint(n, t)
            out.changed = out.changed | ((c1 != c0).any() | (f1 != f0).any()).to(device)
            dp = f1[1:] - f0[1:]
            out.diff_sq = out.diff_sq + (dp * dp).mean().to(device)
            out.ref_sq = out.ref_sq + f0[0].to(device)
        return out, now


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
