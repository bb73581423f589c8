#!/usr/bin/env bash
# The one-shot GPU check of a session that is lent a device (DEVELOPERS.md): build with the CUDA
# kernels, run the whole test suite on the GPU, compute-sanitizer over the CUDA kernels, and the
# CUDA benchmarks. Everything lands in $OUT (at most 8 files). Run from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} OPQN_WITH_CUDA=1
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python3 -c "import opqn_ext; print(opqn_ext.build_info())" | tee -a "$OUT/device.txt"
python3 -m pytest python_tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider \
  python_tests/test_soft_quantize.py python_tests/test_encode.py python_tests/test_adc_topk.py \
  -k "cuda and (reference_float64 or ties or outside or encode_is)" > "$OUT/sanitizer.log" 2>&1
echo "compute-sanitizer memcheck rc=$?"; tail -5 "$OUT/sanitizer.log"
python3 benchmarks/bench_soft_quantize.py --device cuda --repeats 100 --json "$OUT/soft_quantize_cuda.json" \
  2>&1 | tee "$OUT/bench_soft_quantize_cuda.txt" | tail -10
python3 benchmarks/bench_adc_cuda.py --json "$OUT/adc_cuda.json" 2>&1 | tee "$OUT/bench_adc_cuda.txt" | tail -16
