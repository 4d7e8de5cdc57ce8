#!/usr/bin/env bash
# One device call's worth of GPU work (see ../shared/DEVICE.md): install, GPU tests, both benchmarks.
# Usage on the lent machine, from the repo root:  bash bench/gpu.sh /tmp/m/smollm2.gguf
# Everything lands in $OUT (default ./results/gpu): pytest log, sampler.json/png, decode.json/png.
set -uo pipefail
GGUF=${1:?path to the SmolLM2 GGUF}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
timeout 240 python3 -m pytest tests/test_sampler.py tests/test_sampler_api.py tests/test_engine.py -q -x \
  -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 150 python3 -m rtkern.cli bench sampler --no-progress --out "$OUT" > "$OUT/sampler.txt" 2>&1
timeout 300 python3 -m rtkern.cli bench decode --no-progress --model "$GGUF" llama3-8b-random --out "$OUT" \
  > "$OUT/decode.txt" 2>&1
tail -n 3 "$OUT/pytest.txt"; tail -n 25 "$OUT/sampler.txt"; tail -n 25 "$OUT/decode.txt"
