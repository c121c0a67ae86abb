"""Write the gallery's datasets: synthetic, seeded, in the UCR layout (label first, then the series; gzip'd TSV).

    python examples/gallery/make_data.py            # -> examples/gallery/data/*.tsv.gz
    python examples/gallery/make_data.py --scale 0.25 --out /tmp/data   # a smaller draw (CI)

SYNTHETIC DATA, generated here from a seed; no real recordings.  Three datasets:

* ``SynthSource`` (4 classes, length 64): a Gaussian bump, a square pulse, a sawtooth and a damped sine, each with
  random position, width, amplitude and time jitter, in Gaussian noise.  The source of pretraining: many labels.
* ``SynthTarget`` (2 classes, labels -1/1 like UCR's ECG200, length 64): bump vs. square pulse again, but with
  stronger noise, a random baseline drift and fewer rows.  Related to the source (shared shapes), not the same task:
  the setting in which pretraining on the source can help at small label budgets.
* ``SynthPeriod`` (regression, length 64): a noisy sine whose label is its period in samples (8 to 32).

Each is written as ``<name>_TRAIN.tsv.gz`` and ``<name>_TEST.tsv.gz`` (the same layout as the UCR archive's files).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

LENGTH = 64


def shapes(kind: np.ndarray, rng: np.random.Generator, noise: float, drift: float = 0.0) -> np.ndarray:
    n = len(kind)
    t = np.arange(LENGTH)[None, :] + rng.normal(0, 1.5, (n, 1))  # time jitter
    pos = rng.uniform(16, 48, (n, 1))
    width = rng.uniform(3, 8, (n, 1))
    amp = rng.uniform(0.8, 1.5, (n, 1))
    bump = np.exp(-0.5 * ((t - pos) / width) ** 2)
    square = (np.abs(t - pos) < 1.5 * width).astype(float)
    saw = ((t - pos) % (2 * width + 4)) / (2 * width + 4)
    damped = np.sin((t - pos) / width * 2) * np.exp(-np.abs(t - pos) / (3 * width))
    x = np.select([kind[:, None] == k for k in range(4)], [bump, square, saw, damped]) * amp
    x += noise * rng.standard_normal((n, LENGTH))
    if drift:
        x += drift * rng.standard_normal((n, 1)) * np.linspace(-1, 1, LENGTH)[None, :]
    return x


def write(path: Path, labels: np.ndarray, x: np.ndarray, fmt: str) -> None:
    rows = ["\t".join([format(lab, fmt), *(f"{v:.4f}" for v in row)]) for lab, row in zip(labels, x)]
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row count (default: %(default)s)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    def n(k: int) -> int:
        return max(8, round(k * args.scale))

    for split, rows in (("TRAIN", n(800)), ("TEST", n(400))):
        kind = np.arange(rows) % 4
        write(args.out / f"SynthSource_{split}.tsv.gz", kind + 1, shapes(kind, rng, noise=0.35), "d")
    for split, rows in (("TRAIN", n(300)), ("TEST", n(400))):
        kind = np.arange(rows) % 2  # bump (-1) vs. square pulse (1)
        write(args.out / f"SynthTarget_{split}.tsv.gz", np.where(kind == 1, 1, -1),
              shapes(kind, rng, noise=0.8, drift=0.6), "d")
    for split, rows in (("TRAIN", n(400)), ("TEST", n(300))):
        period = rng.uniform(8, 32, rows)
        t = np.arange(LENGTH)[None, :]
        x = np.sin(2 * np.pi * t / period[:, None] + rng.uniform(0, 2 * np.pi, (rows, 1)))
        write(args.out / f"SynthPeriod_{split}.tsv.gz", period, x + 0.4 * rng.standard_normal(x.shape), ".3f")
    print(f"wrote {args.out}/Synth{{Source,Target,Period}}_{{TRAIN,TEST}}.tsv.gz (synthetic, seed {args.seed})")


if __name__ == "__main__":
    main()
