#!/usr/bin/env bash
# The GPU checks the open issues wait for, as commands of under 10 minutes each for the lent machine.
# Every result (logs, --json reports) goes under $OUT (default /tmp/device_out); copy the printed tables into
# bench/RESULTS.md with the command, device, date and commit they print.
#
#   bash bench/device_checks.sh kernels   # ~4 min: GPU kernel tests + do_bench (issue 5), k-means on the GPU,
#                                         #         a 1-GPU torchrun run (issue 6)
#   bash bench/device_checks.sh train     # ~8 min: naive vs fast (and DALI, if importable) throughput under
#                                         #         compile off / reduce-overhead, a 3-minute time to accuracy (issue 4)
#
# Run from the repository root, with PYTHONPATH=. (and /tmp/site for DALI, see ../shared/device/README.md).
# CIFAR-10 JPEGs are looked for in $CIFAR (default /tmp/data/cifar10-jpeg, where the staging puts them, then
# ../shared/datasets/cifar10-jpeg); without them the runs that need images use the bundled digits.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONPATH=".:${PYTHONPATH:-}"
CIFAR=${CIFAR:-/tmp/data/cifar10-jpeg}
[ -d "$CIFAR/train" ] || CIFAR=../shared/datasets/cifar10-jpeg
have_cifar() { [ -d "$CIFAR/train" ]; }
step() {   # step NAME COMMAND...: run, keep the log, go on after a failure (the summary lists it)
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -25 "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git rev-parse --short HEAD;
  date -u; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  >"$OUT/machine.txt" 2>&1

case "${1:-}" in
kernels)
  step kernel_tests python -m pytest -q -m gpu tests/test_kernels.py -x
  step gpu_tests python -m pytest -q -m gpu tests/test_prefetch.py tests/test_fast_step.py tests/test_stream.py \
    tests/test_dali.py
  step bench_kernels python bench/bench_kernels.py --json "$OUT/bench_kernels.json"
  step microbench python -m pytest -q -m gpu tests/test_microbench.py --benchmark-enable \
    --benchmark-json "$OUT/microbench.json"
  step bench_kmeans python bench/bench_kmeans.py --json "$OUT/bench_kmeans.json"
  if have_cifar; then data=(cifar10 --data.source=folder "--data.root=$CIFAR" "--data.splits=[test]"); \
  else data=(digits); fi
  step torchrun_1gpu torchrun --standalone --nproc_per_node=1 -m fastmice train "${data[@]}" \
    --run-dir "$OUT/torchrun_run" --train.max_steps=120 --train.progress=false
  ;;
train)
  have_cifar && data=(--data "$CIFAR/train") || data=()
  paths=naive,fast
  python -c "import nvidia.dali" 2>/dev/null && have_cifar && paths=naive,fast,dali
  step bench_train_off python bench/bench_train.py --device cuda --steps 60 --warmup 15 --workers 16 \
    --compile off --paths "$paths" "${data[@]}" --json "$OUT/bench_train_off.json"
  step bench_train_ro python bench/bench_train.py --device cuda --steps 60 --warmup 15 --paths fast \
    --compile reduce-overhead --json "$OUT/bench_train_reduce_overhead.json"
  step bench_train_ro_noprefetch python bench/bench_train.py --device cuda --steps 60 --warmup 15 --paths fast \
    --phases end_to_end --compile reduce-overhead --override train.prefetch=false \
    --json "$OUT/bench_train_reduce_overhead_noprefetch.json"
  if have_cifar; then
    step tta python bench/time_to_accuracy.py --minutes 3 --data "$CIFAR" --compile reduce-overhead \
      --run-dir "$OUT/tta_run" --json "$OUT/tta.json"
  fi
  ;;
*)
  echo "usage: bash bench/device_checks.sh kernels|train" >&2
  exit 2
  ;;
esac
cat "$OUT/summary.txt"
