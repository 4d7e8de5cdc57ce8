#!/usr/bin/env bash
# GPU work in device-call-sized parts (see ../shared/DEVICE.md). From the repo root on the lent machine:
#   bash bench/gpu.sh targets                               # first: issue 3's B=1 targets, no GGUF needed (~8 min)
#   bash bench/gpu.sh /tmp/m/smollm2.gguf tests sampler     # ~6 min
#   bash bench/gpu.sh /tmp/m/smollm2.gguf decode-small      # the main job, SmolLM2 (~7 min, budgeted)
#   bash bench/gpu.sh /tmp/m/smollm2.gguf decode-8b         # the main job, Llama-3-8B shape (~7 min)
#   bash bench/gpu.sh /tmp/m/smollm2.gguf kernels score train
# Parts: targets, tests (GPU pytest), sampler, kernels, score, train, decode-small, decode-8b (default: all
# but targets, and score and decode-small only with a GGUF; several 10-min calls). `targets` measures B=1
# bf16 on random weights of the SmolLM2-135M and Llama-3-8B shapes (the issue's gpt-fast baselines use
# random weights too), so it needs no carried GGUF:
# with 15 device-minutes a session it is the one call to make if there is time for one. The decode parts
# rewrite their JSON/table after every point and stop starting points after --time-budget, so a call's
# limit never costs what was measured.
# Wheels carried in .whl/ (gguf: the GGUF loader needs it; DEVICE.md) are installed first.
# Everything lands in $OUT (default ./results/gpu): pytest.txt, sampler/kernels/decode .json/.md/.png.
set -uo pipefail
GGUF=
case ${1:-} in *.gguf) GGUF=$1; shift ;; esac
# Without a GGUF the default leaves out the parts that need it (score, decode-small).
PARTS=${*:-tests sampler kernels $([ -n "$GGUF" ] && echo score) train $([ -n "$GGUF" ] && echo decode-small) decode-8b}
needs_gguf() { [ -n "$GGUF" ] || { echo "part $1 needs the SmolLM2 GGUF as the first argument" >&2; exit 2; }; }
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
for part in $PARTS; do
  case $part in
    targets)
      for shape in smollm2-135m llama3-8b; do
        # 2 x 270 s + install stays inside a 600-s call; hf-static (last) is the point a slow start drops
        timeout 270 python3 -m rtkern.cli bench decode --no-progress --model $shape-random --batch 1 \
          --methods rtkern-triton rtkern gpt-fast hf-static --time-budget 150 --out "$OUT/targets-$shape" \
          > "$OUT/targets-$shape.txt" 2>&1
        tail -n 8 "$OUT/targets-$shape.txt"
        rm -f "$OUT/targets-$shape/decode.png"  # a call brings back 8 files: gpu.txt, 2 logs, 2 x json + md
      done ;;
    tests)
      timeout 300 python3 -m pytest tests/test_sampler.py tests/test_sampler_api.py tests/test_engine.py \
        tests/test_graph_safe.py tests/test_model_kernels.py tests/test_scoring.py \
        -q --maxfail=5 -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
      echo "pytest rc=$?" >> "$OUT/pytest.txt"; tail -n 3 "$OUT/pytest.txt" ;;
    sampler)
      timeout 150 python3 -m rtkern.cli bench sampler --no-progress --out "$OUT" > "$OUT/sampler.txt" 2>&1
      tail -n 25 "$OUT/sampler.txt" ;;
    kernels)
      timeout 200 python3 -m rtkern.cli bench kernels --out "$OUT" > "$OUT/kernels.txt" 2>&1
      tail -n 30 "$OUT/kernels.txt" ;;
    score)
      needs_gguf score
      timeout 200 python3 -m rtkern.cli bench score --model "$GGUF" --out "$OUT" > "$OUT/score.txt" 2>&1
      tail -n 8 "$OUT/score.txt" ;;
    train)
      timeout 300 python3 -m rtkern.cli bench train --out "$OUT" > "$OUT/train.txt" 2>&1
      tail -n 8 "$OUT/train.txt" ;;
    decode-small|decode-8b)
      [ "$part" = decode-8b ] || needs_gguf "$part"
      model=$([ "$part" = decode-small ] && echo "$GGUF" || echo llama3-8b-random)
      timeout 560 python3 -m rtkern.cli bench decode --no-progress --model "$model" --time-budget 420 \
        --out "$OUT/$part" > "$OUT/$part.txt" 2>&1
      tail -n 25 "$OUT/$part.txt" ;;
    *) echo "unknown part $part (targets|tests|sampler|kernels|score|train|decode-small|decode-8b)" >&2; exit 2 ;;
  esac
done
