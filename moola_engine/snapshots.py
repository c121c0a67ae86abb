"""Weight snapshots for the delta checks: exact device copies, or fingerprints for models too big to copy.

Both stores answer the same question for a set of named tensors: did any bit
change since the snapshot, and by how much?  All results stay on the device
as tensors; the caller reads them back in one host sync per check.

``exact``
    A clone of every tensor on its own device (memory: one more copy of the
    checked tensors).  ``changed`` compares the bit patterns (so -0.0 vs 0.0 and
    NaN payloads count), ``max_abs_delta`` and ``||dw|| / ||w||`` are exact.

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
    """Device scalars for one set of tensors: changed (bool), max |dw| (NaN in fingerprint mode), ||dw||², ||w0||²."""

    def __init__(self, device: torch.device) -> None:
        z = torch.zeros((), dtype=torch.float64, device=device)
        self.changed = torch.zeros((), dtype=torch.bool, device=device)
        self.max_abs = z.clone()
        self.diff_sq = z.clone()
        self.ref_sq = z.clone()

    def as_tensor(self) -> torch.Tensor:
        """[changed, max_abs, ||dw||, ||dw|| / ||w0||] as one float64 tensor (read back with one sync)."""
        norm = self.diff_sq.sqrt()
        rel = norm / self.ref_sq.sqrt().clamp_min(1e-30)
        return torch.stack([self.changed.double(), self.max_abs, norm, rel])


class Store(Protocol):
    mode: str
    estimate: bool

    def take(self, named: Named) -> dict[str, Any]: ...

    def delta(self, snap: dict[str, Any], named: Named, device: torch.device) -> Delta: ...


class ExactStore:
    mode = "exact"
    estimate = False

    @torch.no_grad()
    def take(self, named: Named) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in named}

    @torch.no_grad()
    def delta(self, snap: dict[str, torch.Tensor], named: Named, device: torch.device) -> Delta:
        """Bitwise comparison plus max |dw|, ||dw|| and ||w0||, with fused (foreach) kernels where they exist."""
        out = Delta(device)
        now = [t.detach() for _, t in named]
        before = [snap[n] for n, _ in named]
        if not now:
            return out
        # exact: any differing bit pattern (catches -0.0 vs 0.0 and NaN payloads that a float compare misses)
        out.changed = torch.stack([(bits(t) != bits(b)).any() for t, b in zip(now, before, strict=True)]).any().to(device)
        pairs = [(t, b) for t, b in zip(now, before, strict=True) if t.numel()]
        floats = [(t, b) for t, b in pairs if t.is_floating_point()]
        others = [(t, b) for t, b in pairs if not t.is_floating_point()]
        if floats:
            diffs = torch._foreach_sub([t for t, _ in floats], [b for _, b in floats])
            out.max_abs = torch.stack([d.abs().amax() for d in diffs]).amax().double().to(device)
            out.diff_sq = torch.stack(torch._foreach_norm(diffs, 2)).double().pow(2).sum().to(device)
            out.ref_sq = torch.stack(torch._foreach_norm([b for _, b in floats], 2)).double().pow(2).sum().to(device)
        for t, b in others:
            out.max_abs = torch.maximum(out.max_abs, (t.double() - b.double()).abs().max().to(device))
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
        out = Delta(device)
        out.max_abs = torch.full((), float("nan"), dtype=torch.float64, device=device)
        for n, t in named:
            c0, f0 = snap[n]
            c1, f1 = self.fingerprint(n, t)
            out.changed = out.changed | ((c1 != c0).any() | (f1 != f0).any()).to(device)
            dp = f1[1:] - f0[1:]
            out.diff_sq = out.diff_sq + (dp * dp).mean().to(device)
            out.ref_sq = out.ref_sq + f0[0].to(device)
        return out


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
