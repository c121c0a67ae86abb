"""The engine's DataLoader path against a hand-written DataLoader loop doing the same work.

    python benchmarks/dataloader.py                     # 7 rounds, CPU, 1 thread
    python benchmarks/dataloader.py --quick             # smoke: small sizes, 2 rounds
    python benchmarks/dataloader.py --workers 2 --json out.json

Both variants train the same MLP (input (T, C) flattened -> 256 -> 256 -> head) on the same
``TensorDataset`` through a ``DataLoader`` with the same batch size, shuffling generator and worker count,
AdamW with one param group per model group, ``immediate`` schedule (everything trains), a validation pass
per epoch:

* ``plain``: ``for x, y in loader: zero_grad; loss; backward; step`` and a validation loop;
* ``engine``: :class:`moola_engine.core.engine.Engine` with the data as
  :class:`moola_engine.core.data.LoaderData`, no checks, no run folder.

Each round runs both, in an order rotated from round to round; the table reports the median ratio
engine / plain over rounds (issue 18's target: 1.03 or better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without pip install
    sys.path.insert(0, str(ROOT))

from moola_engine.config import GroupSpec, TrainConfig  # noqa: E402
from moola_engine.core.batches import loader_generator  # noqa: E402
from moola_engine.core.data import LoaderData, LoaderOptions  # noqa: E402
from moola_engine.core.engine import Engine  # noqa: E402
from moola_engine.core.plugins import build_plugin_manager, load_strategies, select_strategy  # noqa: E402


class Mlp(nn.Module):
    def __init__(self, t: int, c: int, h: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(t * c, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.head = nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


GROUPS = [GroupSpec(name="encoder", modules=["enc"]), GroupSpec(name="head", modules=["head"], head=True)]


def make_data(n: int, t: int, c: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :, 0].mean(dim=1) > 0).long())


def plain(args: argparse.Namespace, train: torch.utils.data.Dataset, val: torch.utils.data.Dataset) -> float:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Mlp(args.t, args.c, args.hidden)
    opt = torch.optim.AdamW([{"params": model.enc.parameters()}, {"params": model.head.parameters()}], lr=1e-3)
    for epoch in range(args.epochs):
        model.train()
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True,
                                             generator=loader_generator(0, epoch), num_workers=args.workers)
        losses = []
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.stack(losses).mean().item()
        model.eval()
        with torch.no_grad():
            outs, ys = [], []
            for x, y in torch.utils.data.DataLoader(val, batch_size=1024, num_workers=args.workers):
                outs.append(model(x))
                ys.append(y)
            out, yy = torch.cat(outs), torch.cat(ys)
            nn.functional.cross_entropy(out, yy).item()
            (out.argmax(1) == yy).float().mean().item()
    return time.perf_counter() - t0


def engine(args: argparse.Namespace, train: torch.utils.data.Dataset, val: torch.utils.data.Dataset) -> float:
    pm, registry = build_plugin_manager()
    strat = select_strategy("immediate", load_strategies(ROOT / "strategies.toml", registry), "strategies.toml").build()
    pm.register(strat, name="strategy")
    opts = LoaderOptions(num_workers=args.workers, pin_memory=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=1e-3, seed=0, device="cpu", threads=args.threads)
    eng = Engine(Mlp(args.t, args.c, args.hidden), train=cfg, groups=GROUPS, pm=pm, strategy=strat,
                 train_data=LoaderData(dataset=train, options=opts), val_data=LoaderData(dataset=val, options=opts))
    eng.fit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = {"rounds": 7, "epochs": 4, "n": 8192, "t": 32, "c": 4, "hidden": 256, "batch": 64, "workers": 0, "threads": 1}
    for name, default in sizes.items():  # rows (n), window (t x c), MLP width, DataLoader workers, torch threads
        ap.add_argument(f"--{name}", type=int, default=default, help=f"default: {default}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.n, args.epochs, args.hidden = 2, 512, 2, 32
    torch.set_num_threads(args.threads)
    train, val = make_data(args.n, args.t, args.c, 0), make_data(args.n // 8, args.t, args.c, 1)
    variants = {"plain": plain, "engine": engine}
    engine(args, train, val)  # warm-up: imports, plugin discovery, first-call costs
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in order[r % 2:] + order[:r % 2]:
            times[name].append(variants[name](args, train, val))
    ratios = [e / p for e, p in zip(times["engine"], times["plain"], strict=True)]
    print(f"DataLoader path: {args.n} rows, batch {args.batch}, {args.epochs} epochs, {args.workers} workers, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:<7} median {statistics.median(ts):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  engine / plain: median {statistics.median(ratios):.3f}  (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                                         "ratios": ratios, "median_ratio": statistics.median(ratios)}, indent=2))


if __name__ == "__main__":
    main()
