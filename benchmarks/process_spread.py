"""How much one loop's speed moves between fresh processes: why overhead.py pools processes (--repeat).

    python benchmarks/process_spread.py              # 8 processes x (1 warm-up + 3 timed) plain-loop runs
    python benchmarks/process_spread.py --processes 4 --runs 5

Each process runs ``overhead.py``'s hand-written loop (fine-tuning scenario, 1 thread) and reports the
median of its timed runs and their spread; the summary compares the spread between processes with the
spread inside them.  Nothing of the engine runs here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

CHILD = """
import json, statistics, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {parent!r})
import torch
import overhead
torch.set_num_threads(1)
dev = torch.device("cpu")
sc = (overhead.QUICK if {quick} else overhead.SCENARIOS)["finetune"]
train, val = overhead.make_data(sc, dev)
overhead.run_plain(sc, train, val, dev)
times = []
for _ in range({runs}):
    t0 = time.perf_counter()
    overhead.run_plain(sc, train, val, dev)
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per process, after one warm-up run")
    ap.add_argument("--quick", action="store_true", help="overhead.py's small fine-tuning scenario (CI smoke)")
    args = ap.parse_args(argv)
    code = CHILD.format(root=str(ROOT), parent=str(ROOT.parent), runs=args.runs, quick=args.quick)
    medians, inside = [], []
    for i in range(args.processes):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        times = json.loads(out.strip().splitlines()[-1])
        medians.append(statistics.median(times))
        inside.append((max(times) - min(times)) / statistics.median(times))
        print(f"process {i + 1}: median {medians[-1]:.3f} s  runs {', '.join(f'{t:.3f}' for t in times)}", flush=True)
    lo, hi, mid = min(medians), max(medians), statistics.median(medians)
    print(f"between processes: medians {lo:.3f}..{hi:.3f} s ({(hi - lo) / mid:.1%} of their median); "
          f"inside a process: at most {max(inside):.1%} (max - min over its runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
