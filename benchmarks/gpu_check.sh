#!/usr/bin/env bash
# One short, bounded pass over genaf's CUDA paths on a GPU machine (no installation needed there
# beyond torch, torchvision and genaf's own dependencies; the package runs from src/).
#
#     OUT=gpu-check bash benchmarks/gpu_check.sh            # all steps: 143 s on one H100
#     DEVICE=cpu COMPILE=none BUDGET=900 bash benchmarks/gpu_check.sh   # the same steps on a CPU
#
# Steps, each with its own time limit and all of them under one overall BUDGET (seconds), so the
# whole run ends in time and what finished is kept: the machine, the quick demo end to end
# (fine-tuning, DAE crafting, evaluation, report), Gen-AF fine-tuning with bf16 autocast,
# channels_last and torch.compile, the speed benchmark (stage 1 against its bound and the
# reference-style step, bf16 channels-last step and its arithmetic floor, stage 2, bf16
# agreement), the torch.compile test, and the full demo. Every step writes OUT/STEP.log; one
# line per step (exit code and seconds) goes to OUT/summary.txt.
# Fashion-MNIST is read from $GENAF_FASHION_MNIST, or from .gpu-data/fashion-mnist when a copy
# of the Debian package's files was carried there.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE:-default}
BUDGET=${BUDGET:-520}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -z "${GENAF_FASHION_MNIST:-}" ] && [ -d .gpu-data/fashion-mnist ]; then
  export GENAF_FASHION_MNIST=$PWD/.gpu-data/fashion-mnist
fi
deadline=$(($(date +%s) + BUDGET))

step() { # step NAME LIMIT CMD...: run CMD for at most min(LIMIT, time left) seconds
  local name=$1 limit=$2 left rc start
  shift 2
  left=$((deadline - $(date +%s)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "$name skipped (budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}

step env 30 bash -c "(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true);
  $PY -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__,
  \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'"
step demo-quick 150 $PY -m genaf demo --quick --device "$DEVICE" --out "$OUT/demo-quick"
step finetune-bf16-compile 150 $PY -m genaf finetune --method genaf --device "$DEVICE" --amp bf16 \
  --channels-last --compile "$COMPILE" --epochs 2 --n-train 1000 --n-val 250 --n-test 500 --out "$OUT/ft-bf16"
step speed 240 $PY benchmarks/speed.py --device "$DEVICE" --quick --parts stage1,stage2,bf16 \
  --compile "$COMPILE" --out "$OUT/speed.json"
step test-compile 90 $PY -m pytest -q -p no:cacheprovider tests/test_compile.py
step demo-full 300 $PY -m genaf demo --device "$DEVICE" --out "$OUT/demo-full"
cat "$OUT/summary.txt"
