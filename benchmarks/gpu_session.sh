#!/usr/bin/env bash
# The GPU checks of the cost models, as one script for a lent H100 / H200 (a bare machine with
# torch but without xplan): GEMM and attention at the validation rows' shapes, then the runtime's
# real step time and peak memory against the prediction, then the kernel registry's CUDA kernels
# (benchmarks/kernels_gpu.py), then the allocator (reserved vs allocated with and without expandable
# segments) and the offload path on a real step. Writes logs and JSON under $OUT (or ./gpu-out).
#
#   bash benchmarks/gpu_session.sh [PROFILE [CASES]]   # PROFILE prices the rows (default: h200);
#                                                     # CASES: the rows' hardware, or all (default)
#
# Missing pure-Python packages (pydantic and its deps) are installed from ./.whl when present.
set -o pipefail
profile=${1:-h200}
cases=${2:-all}
repo=$(cd "$(dirname "$0")/.." && pwd -P)
out=${OUT:-$repo/gpu-out}
mkdir -p "$out" /tmp/site/xplan
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl || exit 1
fi
# xplan without installing it: its top-level folders are the package's sub-packages.
cp -r "$repo"/xplan/. /tmp/site/xplan/
for d in planner runtime cost_models hw_profiles; do ln -sfn "$repo/$d" "/tmp/site/xplan/$d"; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
cd /tmp || exit 1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$out/gpu.txt"
timeout 120 python3 "$repo/benchmarks/attention_shapes.py" --profile "$profile" --cases-on "$cases" \
  --json "$out/attention_shapes.json" 2>&1 | tee "$out/attention_shapes.txt"
timeout 240 python3 "$repo/benchmarks/gemm_shapes.py" --profile "$profile" --cases-on "$cases" --settle 8 \
  --json "$out/gemm_shapes.json" 2>&1 | tee "$out/gemm_shapes.txt"
timeout 150 python3 "$repo/benchmarks/gpu_check.py" --profile "$profile" --compare 2>&1 | tee "$out/gpu_check.txt"
timeout 420 python3 "$repo/benchmarks/kernels_gpu.py" --json "$out/kernels_gpu.json" 2>&1 | tee "$out/kernels_gpu.txt"
timeout 240 python3 "$repo/benchmarks/allocator_check.py" --profile "$profile" --json "$out/allocator_check.json" \
  2>&1 | tee "$out/allocator_check.txt"
# xplan's runtime against a torchtitan-style plain-torch baseline (same models, batches, precision)
for precision in bf16 fp8; do
  timeout 420 python3 "$repo/benchmarks/vs_torchtitan.py" --profile "$profile" --precision "$precision" \
    --json "$out/vs_torchtitan-$precision.json" 2>&1 | tee "$out/vs_torchtitan-$precision.txt"
done
