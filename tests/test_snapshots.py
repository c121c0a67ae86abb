"""The weight snapshots behind the delta checks: bitwise change detection and exact delta sizes.

The exact store packs each group into flat buffers and, on the CPU, reads values on the host (a
``torch.equal`` per buffer, arithmetic only where something changed); on an accelerator it uses
device-side reductions.  Both paths run here on the CPU and must give the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from moola_engine.checks.snapshots import CHUNK, PROJECTIONS, SMALL, ExactStore, FingerprintStore

CPU = torch.device("cpu")


def named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("w", torch.randn(64, 32, generator=g)), ("b", torch.randn(32, generator=g)),
            ("h", torch.randn(16, generator=g).half()), ("n", torch.tensor(7, dtype=torch.int64)),
            ("empty", torch.zeros(0))]


def measure(snap_named, now_named, host_reads):
    """[changed, max_abs, ||dw||, rel] through the store's own snapshot and comparison."""
    store = ExactStore(host_reads=host_reads)
    return store.delta(store.take(snap_named), now_named, CPU).as_tensor().tolist()


def reference(before, after):
    """The same four numbers computed element by element in float64."""
    changed = any(not torch.equal(_bits(a), _bits(b)) for (_, a), (_, b) in zip(after, before, strict=True))
    diffs = [(a.double() - b.double()) for (_, a), (_, b) in zip(after, before, strict=True) if a.numel()]
    max_abs = max(float(d.abs().max()) for d in diffs)
    diff = math.sqrt(sum(float(d.pow(2).sum()) for (_, a), d in zip(after, diffs) if a.is_floating_point()))
    ref = math.sqrt(sum(float(b.double().pow(2).sum()) for _, b in before if b.is_floating_point()))
    return [float(changed), max_abs, diff, diff / ref]


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32) if t.is_floating_point() else t


def edit(items, name, fn):
    return [(n, fn(t.clone()) if n == name else t.clone()) for n, t in items]


@pytest.mark.parametrize("host_reads", [True, False])
def test_unchanged_tensors_measure_zero(host_reads) -> None:
    before = named()
    assert measure(before, [(n, t.clone()) for n, t in before], host_reads) == [0.0, 0.0, 0.0, 0.0]


def set_(index, value):
    def fn(t):
        t.view(-1)[index] = value
        return t
    return fn


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize(("name", "fn"), [
    ("w", set_(-1, 3.25)),          # one element, the last one of the largest buffer
    ("w", lambda t: t * 1.001),     # every element a little
    ("b", set_(0, -100.0)),
    ("h", set_(3, 2.0)),            # float16 bucket
    ("n", lambda t: t + 5),         # an integer buffer (BatchNorm's num_batches_tracked)
])
def test_a_change_anywhere_is_caught_and_sized_exactly(host_reads, name, fn) -> None:
    before = named()
    after = edit(before, name, fn)
    got = measure(before, after, host_reads)
    want = reference(before, after)
    assert got[0] == 1.0
    assert got[1:] == pytest.approx(want[1:], rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("host_reads", [True, False])
def test_bitwise_changes_a_float_compare_misses(host_reads) -> None:
    zero = [("w", torch.zeros(1000))]
    signed = measure(zero, [("w", -torch.zeros(1000))], host_reads)  # -0.0 vs 0.0
    assert signed[:2] == [1.0, 0.0]
    assert math.copysign(1.0, signed[1]) == 1.0  # max |dw| is +0.0, never -0.0
    nan = torch.full((10,), math.nan)
    other = nan.clone()
    other.view(torch.int32)[4] += 1  # a different NaN payload
    assert measure([("w", nan)], [("w", nan.clone())], host_reads)[0] == 0.0  # the same bits: unchanged
    assert measure([("w", nan)], [("w", other)], host_reads)[0] == 1.0


def test_delta_and_take_returns_the_snapshot_of_now_as_a_copy() -> None:
    store = ExactStore()
    p = torch.randn(50)
    snap = store.take([("p", p)])
    p.add_(1.0)
    delta, now = store.delta_and_take(snap, [("p", p)], CPU)
    present = p.clone()
    assert delta.as_tensor().tolist()[:2] == [1.0, pytest.approx(1.0)]
    assert store.delta(now, [("p", p)], CPU).as_tensor().tolist()[0] == 0.0  # now == take() of the present
    p.add_(1.0)  # the snapshot is a copy, not a view of the parameter
    assert store.delta(now, [("p", p)], CPU).as_tensor().tolist()[0] == 1.0
    assert torch.equal(now.views()["p"], present)


def test_a_different_set_of_names_is_compared_name_by_name() -> None:
    store = ExactStore()
    a, b = torch.randn(5), torch.randn(7)
    snap = store.take([("a", a), ("b", b)])
    b2 = b.clone()
    b2[0] += 2.0
    got = store.delta(snap, [("b", b2)], CPU).as_tensor().tolist()  # "a" left the set: only "b" compared
    assert got[:2] == [1.0, pytest.approx(2.0)]
    with pytest.raises(KeyError):
        store.delta(snap, [("c", torch.randn(5))], CPU)


def test_fingerprints_catch_one_element_and_a_sign_of_zero() -> None:
    store = FingerprintStore()
    w = torch.randn(4096)
    snap = store.take([("w", w)])
    assert store.delta(snap, [("w", w.clone())], CPU).as_tensor().tolist()[0] == 0.0
    w2 = w.clone()
    w2[1234] = torch.nextafter(w2[1234], torch.tensor(math.inf))  # one ulp
    assert store.delta(snap, [("w", w2)], CPU).as_tensor().tolist()[0] == 1.0
    z = torch.zeros(100)
    zsnap = store.take([("z", z)])
    assert store.delta(zsnap, [("z", -z)], CPU).as_tensor().tolist()[0] == 1.0


def test_the_accelerator_path_asks_the_device_for_nothing() -> None:
    """Under the CPU proxy of CUDA's sync debug mode: the device path runs; the host path is what it catches."""
    from moola_engine.core.hostsync import HostSyncError, sync_guard

    before = named()
    after = edit(before, "w", set_(7, 9.0))
    for host_reads in (False, True):
        store = ExactStore(host_reads=host_reads)
        snap = store.take(before)
        with sync_guard(CPU, "error"):
            if host_reads:
                with pytest.raises(HostSyncError, match="aten::(equal|_local_scalar_dense)"):  # memcmp: no op
                    store.delta_and_take(snap, after, CPU)
            else:
                delta, _ = store.delta_and_take(snap, after, CPU)
                row = delta.as_tensor()
    assert row.tolist()[0] == 1.0  # read after the guard, as the check does at the epoch end


def test_off_the_cpu_the_default_is_the_device_path() -> None:
    meta = torch.device("meta")  # no values at all: a host read (torch.equal) would fail here
    items = [("w", torch.empty(8, 4, device=meta)), ("b", torch.empty(4, device=meta))]
    store = ExactStore()
    delta, now = store.delta_and_take(store.take(items), items, meta)
    assert delta.as_tensor().device.type == "meta"
    assert now.buffers[(torch.float32, meta)].shape == (36,)


# --------------------------------------------------------------------------- chunked fingerprints


def fp_changed(before, after) -> float:
    store = FingerprintStore()
    return store.delta(store.take(before), after, CPU).as_list()[0]


def big() -> torch.Tensor:
    """Three full chunks and a partial one (the last chunk holds 123 elements)."""
    return torch.randn(3 * CHUNK + 123, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("index", [0, 1234, CHUNK - 1, CHUNK, 3 * CHUNK, -1])  # -1, 3*CHUNK: the last chunk
def test_fingerprints_catch_a_one_ulp_change_in_any_chunk(index) -> None:
    w = big()
    w2 = w.clone()
    w2[index] = torch.nextafter(w2[index], torch.tensor(math.inf))
    assert fp_changed([("w", w)], [("w", w.clone())]) == 0.0
    assert fp_changed([("w", w)], [("w", w2)]) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fingerprints_catch_sign_flips_one_or_many_in_a_chunk(dtype) -> None:
    w = big().to(dtype).abs() + 0.5
    for idx in ([5], [CHUNK + 2, CHUNK + 9], [-1, -2], list(range(CHUNK, 2 * CHUNK))):
        w2 = w.clone()
        w2[idx] = -w2[idx]  # each bit pattern differs by the sign bit only: the worst case for modular sums
        assert fp_changed([("w", w)], [("w", w2)]) == 1.0, (dtype, idx[:3])


def test_fingerprints_catch_the_sign_of_zero_a_nan_payload_and_integers() -> None:
    z = torch.zeros(100)
    assert fp_changed([("z", z)], [("z", -z)]) == 1.0
    nan = torch.full((10,), math.nan)
    other = nan.clone()
    other.view(torch.int32)[4] += 1
    assert fp_changed([("w", nan)], [("w", nan.clone())]) == 0.0
    assert fp_changed([("w", nan)], [("w", other)]) == 1.0
    n = torch.tensor(7, dtype=torch.int64)
    assert fp_changed([("n", n)], [("n", n + 1)]) == 1.0
    assert fp_changed([("n", n)], [("n", n + 2**32)]) == 1.0  # the high word only


def light_changed(before, after, light_before=True, light_after=True) -> float:
    store = FingerprintStore()
    return store.compare(store.take(before, light=light_before), store.take(after, light=light_after),
                         CPU).as_list()[0]


@pytest.mark.parametrize("index", [0, CHUNK - 1, CHUNK, -1])
def test_light_fingerprints_have_no_checksums_and_see_a_one_ulp_change_by_their_word_sums(index) -> None:
    w = big()
    w2 = w.clone()
    w2.view(torch.int32)[index] += 1
    store = FingerprintStore()
    light = store.fingerprint(w, light=True)
    assert light.light and light.checks is None and light.sums.dtype == torch.int32
    assert light.sums.numel() == 4 and light.proj.shape == (PROJECTIONS, 4)
    assert light_changed([("w", w)], [("w", w.clone())]) == 0.0
    assert light_changed([("w", w)], [("w", w2)]) == 1.0
    # a light fingerprint against a full one (the first interval of a group that trains from the start)
    assert light_changed([("w", w)], [("w", w2)], light_before=False) == 1.0
    assert light_changed([("w", w)], [("w", w.clone())], light_before=False) == 0.0


def test_light_word_sums_miss_two_sign_flips_in_a_chunk_that_the_checksums_catch() -> None:
    """The documented limit of a light comparison: two sign-bit flips in one chunk add 2 x 2**31 = 0 mod 2**32.
    The checks compare light fingerprints only where a change is expected, so this can fail a check (a group
    that did move read as not moved), never pass one; a frozen side gets the checksums, which see it."""
    w = big().abs() + 0.5
    w2 = w.clone()
    w2[[CHUNK + 2, CHUNK + 9]] *= -1
    assert light_changed([("w", w)], [("w", w2)]) == 0.0
    assert light_changed([("w", w)], [("w", w2)], light_before=False, light_after=False) == 1.0
    assert fp_changed([("w", w)], [("w", w2)]) == 1.0


def test_light_fingerprints_estimate_the_same_norm_as_full_ones() -> None:
    w = big()
    w2 = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    store = FingerprintStore()
    full = store.compare(store.take([("w", w)]), store.take([("w", w2)]), CPU).as_list()
    light = store.compare(store.take([("w", w)], light=True), store.take([("w", w2)], light=True), CPU).as_list()
    assert light[2:] == full[2:]  # the projections and the norm are the same numbers


def test_fingerprint_checksums_are_exact_integers() -> None:
    """The weights keep every partial sum an integer below 2**53: the worst case has no rounding."""
    store = FingerprintStore()
    worst = torch.full((CHUNK,), -(2**31), dtype=torch.int32)  # the largest word magnitude
    got = store.fingerprint(worst).checks
    w, _ = store.weights(CPU, torch.float32)
    exact = [sum(-(2**31) * int(v) for v in row) for row in w.tolist()]
    assert got.reshape(-1).tolist() == [float(x) for x in exact]
    assert all(abs(x) < 2**53 for x in exact)


def test_fingerprint_norm_estimate_is_exact_for_one_change_per_chunk() -> None:
    w = big()
    w2 = w.clone()
    w2[[3, CHUNK + 7, -1]] += torch.tensor([0.5, -2.0, 1.0])
    store = FingerprintStore()
    delta = store.delta(store.take([("w", w)]), [("w", w2)], CPU).as_list()
    assert delta[0] == 1.0 and math.isnan(delta[1])  # max |dw| is unknown to a fingerprint
    assert delta[2] == pytest.approx(math.sqrt(0.25 + 4.0 + 1.0), rel=1e-5)
    assert delta[3] == pytest.approx(delta[2] / float(w.double().norm()), rel=1e-5)


def test_fingerprints_are_small_and_agree_with_exact_snapshots() -> None:
    before = named()
    fp, exact = FingerprintStore(), ExactStore()
    snap = fp.take(before)
    numbers = sum(f.checks.numel() + f.proj.numel() + 1 for f in snap.values())
    assert numbers <= 8 * (1 + sum(t.numel() for _, t in before) // CHUNK + len(before))  # per chunk, not per element
    for name, fn in [("w", set_(-1, 3.25)), ("b", set_(0, -100.0)), ("h", set_(3, 2.0)), ("n", lambda t: t + 5)]:
        after = edit(before, name, fn)
        assert fp.delta(snap, after, CPU).as_list()[0] == exact.delta(exact.take(before), after, CPU).as_list()[0] == 1.0


# --------------------------------------------------------------------------- exact snapshots reuse their buffers


def large() -> list[tuple[str, torch.Tensor]]:
    """A group above SMALL: compared block by block against the live tensors."""
    g = torch.Generator().manual_seed(2)
    return [("w", torch.randn(SMALL + 5, generator=g)), ("h", torch.randn(300, generator=g).half()),
            ("n", torch.tensor(3, dtype=torch.int64))]


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("items", [named, large], ids=["small", "large"])
def test_reused_exact_snapshots_refresh_without_allocating_and_answer_as_a_new_copy(host_reads, items) -> None:
    before = items()
    store = ExactStore(host_reads=host_reads)
    snap = store.take(before)
    ptrs = {k: b.data_ptr() for k, b in snap.buffers.items()}
    after = edit(before, "w", lambda t: t * 1.001)
    after = edit(after, "h", set_(3, 2.0))
    want, _ = store.delta_and_take(store.take(before), after, CPU)  # a fresh copy
    got, again = store.delta_and_take(snap, after, CPU, reuse=True)
    assert again is snap
    assert got.as_list() == pytest.approx(want.as_list(), rel=1e-4, abs=0.0)  # float32 norms, summed by block
    for n, t in after:  # the snapshot now holds the present values
        assert torch.equal(snap.views()[n], t)
    assert store.delta(snap, after, CPU).as_list() == [0.0, 0.0, 0.0, 0.0]
    first = {k: b.data_ptr() for k, b in snap.buffers.items()}
    later = edit(after, "n", lambda t: t + 1)
    store.delta_and_take(snap, later, CPU, reuse=True)
    second = {k: b.data_ptr() for k, b in snap.buffers.items()}
    if items is large:
        assert ptrs == first == second  # refreshed in place, block by block
    else:
        assert second == ptrs and not set(first.values()) & set(ptrs.values())  # two buffer sets, in turn
    assert torch.equal(snap.views()["n"], dict(later)["n"])


def test_delta_reads_the_live_tensors_without_touching_the_snapshot() -> None:
    store = ExactStore()
    p = torch.randn(3 * (1 << 18) + 5)  # several blocks
    snap = store.take([("p", p)])
    kept = snap.views()["p"].clone()
    p[-1] += 1.0
    assert store.delta(snap, [("p", p)], CPU).as_list()[:2] == [1.0, pytest.approx(1.0)]
    assert torch.equal(snap.views()["p"], kept)


@pytest.mark.parametrize("use_memcmp", [True, False])
def test_same_bits_sees_every_bit_with_and_without_memcmp(monkeypatch: pytest.MonkeyPatch, use_memcmp: bool) -> None:
    from moola_engine.checks import snapshots

    if not use_memcmp:
        monkeypatch.setattr(snapshots, "_MEMCMP", None)
    elif snapshots._MEMCMP is None:
        pytest.skip("libc memcmp cannot be loaded here")
    w = torch.randn(300, 7)
    assert snapshots.same_bits(w, w.clone())
    for i, value in ((0, 0.0), (2099, float("nan"))):
        a, b = w.clone(), w.clone()
        a.view(-1)[i], b.view(-1)[i] = value, -value if value == 0.0 else value
        if value == 0.0:
            assert not snapshots.same_bits(a, b)  # 0.0 and -0.0 are different bits
        else:
            b.view(torch.int32).view(-1)[i] ^= 1  # another NaN payload
            assert not snapshots.same_bits(a, b)
    last = w.clone()
    last.view(-1)[-1] = torch.nextafter(last.view(-1)[-1], torch.tensor(math.inf))  # one ulp, at the very end
    assert not snapshots.same_bits(w, last)
    assert snapshots.same_bits(w.t(), w.clone().t())  # not contiguous: torch.equal on the bit patterns


@pytest.mark.parametrize("small", [True, False])
def test_the_interval_pass_measures_the_distance_to_a_second_snapshot(monkeypatch: pytest.MonkeyPatch,
                                                                     small: bool) -> None:
    from moola_engine.checks import snapshots

    if not small:  # the block-by-block path of large groups, with blocks smaller than a tensor
        monkeypatch.setattr(snapshots, "SMALL", 16)
        monkeypatch.setattr(snapshots, "_block_size", lambda device: 64)
    store = ExactStore()
    pre = [("w", torch.randn(30, 20)), ("b", torch.randn(20)), ("h", torch.randn(5))]
    start = [(n, t + 0.01) for n, t in pre]
    snap = store.take(start)
    pre_snap = store.take(pre[:2])  # the pretrained weights of two of the three tensors
    now = [(n, t + torch.randn_like(t) * 0.1) for n, t in start]
    delta, again = store.delta_and_take(snap, now, CPU, reuse=True, against=pre_snap)
    assert again is snap and delta.as_list()[0] == 1.0
    want = sum(float(((dict(now)[n] - t) ** 2).sum()) for n, t in pre[:2])
    assert delta.against_sq == pytest.approx(want, rel=1e-5)
    want_interval = reference(start, now)
    assert delta.as_list() == pytest.approx(want_interval, rel=1e-5)
    # unchanged since the snapshot: nothing measured (the caller keeps the distance it had)
    unchanged, _ = store.delta_and_take(snap, now, CPU, reuse=True, against=pre_snap)
    assert unchanged.as_list()[0] == 0.0 and unchanged.against_sq is None
