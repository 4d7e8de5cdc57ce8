#!/usr/bin/env bash
# GPU work in device-call-sized parts (see ../shared/DEVICE.md). From the repo root on the lent machine:
#   bash bench/gpu.sh /tmp/m/smollm2.gguf tests sampler     # ~6 min
#   bash bench/gpu.sh /tmp/m/smollm2.gguf kernels decode    # ~8 min
#   bash bench/gpu.sh /tmp/m/smollm2.gguf score train
# Parts: tests (GPU pytest), sampler, kernels, score, train, decode (default: all; more than one 10-min call).
# Everything lands in $OUT (default ./results/gpu): pytest.txt, sampler/kernels/decode .json/.md/.png.
set -uo pipefail
GGUF=${1:?path to the SmolLM2 GGUF}
shift
PARTS=${*:-tests sampler kernels score train decode}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
for part in $PARTS; do
  case $part in
    tests)
      timeout 300 python3 -m pytest tests/test_sampler.py tests/test_sampler_api.py tests/test_engine.py \
        tests/test_model_kernels.py -q -x -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
      echo "pytest rc=$?" >> "$OUT/pytest.txt"; tail -n 3 "$OUT/pytest.txt" ;;
    sampler)
      timeout 150 python3 -m rtkern.cli bench sampler --no-progress --out "$OUT" > "$OUT/sampler.txt" 2>&1
      tail -n 25 "$OUT/sampler.txt" ;;
    kernels)
      timeout 200 python3 -m rtkern.cli bench kernels --out "$OUT" > "$OUT/kernels.txt" 2>&1
      tail -n 30 "$OUT/kernels.txt" ;;
    score)
      timeout 200 python3 -m rtkern.cli bench score --model "$GGUF" --out "$OUT" > "$OUT/score.txt" 2>&1
      tail -n 8 "$OUT/score.txt" ;;
    train)
      timeout 300 python3 -m rtkern.cli bench train --out "$OUT" > "$OUT/train.txt" 2>&1
      tail -n 8 "$OUT/train.txt" ;;
    decode)
      timeout 330 python3 -m rtkern.cli bench decode --no-progress --model "$GGUF" llama3-8b-random --out "$OUT" \
        > "$OUT/decode.txt" 2>&1
      tail -n 25 "$OUT/decode.txt" ;;
    *) echo "unknown part $part (tests|sampler|kernels|score|train|decode)" >&2; exit 2 ;;
  esac
done
