#!/usr/bin/env bash
# One short GPU check (about 10 minutes on an H100/H200), runnable on CPU too (CUDA parts become CPU equivalents,
# the grid and batched steps smoke tests of a few seconds).
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
#   OUT=gpu-results bash benchmarks/gpu_check.sh    # the JSON files go to $OUT (default: the current folder)
#
# On a machine with torch but without the other dependencies, put their wheels in .whl/ first;
# the script installs them with --no-index into /tmp/site.  The checkout is used from PYTHONPATH
# (no pip install), so the built-in strategies are loaded from the source tree (MOOLA_BUILTIN_PLUGINS=1).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null && ! $PY -c "import cattrs, structlog" 2>/dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOOLA_BUILTIN_PLUGINS=${MOOLA_BUILTIN_PLUGINS:-1}
missing=$($PY - <<'PY'
import importlib.util as u
print(" ".join(m for m in ("torch", "numpy", "pluggy", "attrs", "cattrs", "structlog") if u.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then echo "missing python modules: $missing (put their wheels in .whl/)"; exit 1; fi

status=0
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
echo "== 1. device, sync-free step loop, bf16, compile"
timeout 150 $PY benchmarks/gpu_check.py || status=1

if $PY -c "import pytest" 2>/dev/null; then
  echo "== 2. pytest: the CUDA sync test (skipped without CUDA) and the CPU sync proxy"
  timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_speed.py -k "sync" || status=1
else
  echo "== 2. pytest not installed: step 1 ran the same sync check"
fi

cuda=no
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && cuda=yes
echo "== 3. overhead benchmark on the device (fewer rounds)"
if [ $cuda = yes ]; then
  timeout 300 $PY benchmarks/overhead.py --device cuda --rounds 15 --json "$OUT_DIR/gpu_overhead.json" || status=1
else
  timeout 150 $PY benchmarks/overhead.py --quick --scenario finetune --rounds 1 || status=1
fi
echo "== 4. end to end on the bundled data: pretrain, two-phase fine-tuning with every check, verify"
if [ $cuda = yes ]; then
  work=$(mktemp -d /tmp/moola-gpu-XXXX)
  cfg=examples/.gpu_check_seed.toml  # beside seed.toml: its data paths are relative to the file
  trap 'rm -rf "$cfg" "$work"' EXIT
  sed "s#\.\./artifacts/encoder\.safetensors#$work/encoder.safetensors#" examples/seed.toml > "$cfg"
fi
if [ $cuda = yes ] && ! grep -q "$work/encoder.safetensors" "$cfg"; then
  echo "could not point $cfg at $work: examples/seed.toml no longer names ../artifacts/encoder.safetensors"
  status=1
elif [ $cuda = yes ]; then
  TIMEFORMAT="pretrain: %R s wall"
  time timeout 240 $PY -m moola_engine.cli pretrain --config "$cfg" \
    --out "$work/encoder.safetensors" --device cuda --console none || status=1
  TIMEFORMAT="train: %R s wall"
  time timeout 120 $PY -m moola_engine.cli train --config "$cfg" \
    --strategy two_phase --runs-dir "$work/runs" --console none || status=1
  timeout 60 $PY -m moola_engine.cli verify "$work/runs/latest/events.jsonl" || status=1
else
  echo "(no CUDA: skipped; the test suite runs the same journey on the CPU)"
fi
echo "== 5. the seed grid (5 arms x 10 seeds) on one GPU: ablate --jobs 1, 2, 4, 8 and the memory-aware default"
if [ $cuda = yes ]; then
  # --epochs 12 (two_phase unfreezes at 10) keeps --jobs 1 to a few minutes; skipped points say so (--budget-s)
  timeout 300 $PY benchmarks/gpu_grid.py --devices 0 --epochs 12 --points 1,2,4,8,auto --budget-s 270 \
    --json "$OUT_DIR/gpu_grid.json" || status=1
else
  timeout 120 $PY benchmarks/gpu_grid.py --smoke --json "$OUT_DIR/gpu_grid_smoke.json" || status=1
fi
echo "== 6. batched multi-run training: 16 seeds of one arm, one at a time vs one stacked computation"
if [ $cuda = yes ]; then
  timeout 150 $PY benchmarks/batched.py --device cuda --threads 0 --rounds 2 --json "$OUT_DIR/gpu_batched.json" \
    || status=1
else
  timeout 120 $PY benchmarks/batched.py --seeds 4 --epochs 2 --threads 1 --rounds 1 || status=1
fi
echo "gpu_check.sh: $([ $status = 0 ] && echo all passed || echo FAILURES above)"
exit $status
