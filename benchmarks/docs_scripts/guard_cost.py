"""Per-step cost of the non-finite gradient guard on CPU (SimpleLSTM at seed size, batch 16, window 105).

    .venv/bin/python benchmarks/docs_scripts/guard_cost.py
"""

import time

import torch

from moola_ohlc.models import SimpleLSTM

torch.set_num_threads(1)
torch.manual_seed(0)
model = SimpleLSTM()
x, y = torch.randn(16, 105, 4), torch.randint(0, 2, (16,))
opt = torch.optim.AdamW(model.parameters(), 1e-3)
params = list(model.parameters())
bad = torch.full((len(params),), -1, dtype=torch.long)


def guard() -> None:
    global bad
    amax = torch.stack(torch._foreach_norm([p.grad for p in params], 2))
    bad = torch.where((bad < 0) & ~torch.isfinite(amax), 3, bad)


def step(with_guard: bool) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    if with_guard:
        guard()
    opt.step()


for g in (False, True, False, True):
    t = time.perf_counter()
    for _ in range(30):
        step(g)
    print("guard" if g else "plain", f"{(time.perf_counter() - t) / 30 * 1e3:.2f} ms/step")
t = time.perf_counter()
for _ in range(200):
    guard()
print(f"guard alone {(time.perf_counter() - t) / 200 * 1e6:.0f} us/step")
