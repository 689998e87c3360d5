#!/usr/bin/env bash
# The GPU machine's one call for issue 6: correctness tests, then the benchmark suite. From the repository root:
#     OUT=/some/dir bash tests/gpu/run_gpu_suite.sh [bench_suite.py options]
#     OUT=/some/dir bash tests/gpu/run_gpu_suite.sh --int4     # the int4 (QSUN) vs bf16 decode comparison instead
# Needs only what the GPU image has (torch, triton, transformers, safetensors, msgpack, pytest): no Ray.
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sunray-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
start=$(date +%s)
python3 -m pytest -q -p no:cacheprovider --timeout 600 tests/gpu 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "tests took $(( $(date +%s) - start )) s, exit code $tests_rc"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    python3 tests/gpu/bench_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log"
fi
echo "tests exit code: $tests_rc; total $(( $(date +%s) - start )) s"
