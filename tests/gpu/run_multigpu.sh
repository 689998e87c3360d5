#!/usr/bin/env bash
# Issue 13's headline (python -m experiments.serving_multigpu: conventional = a dedicated decode GPU per model,
# SUN = fewer shared decode GPUs, capacity at the same TPOT SLO, Zipf 0 / 1 / 1.5) on a lent multi-GPU machine.
# It runs longer than one 10-minute device call (about 21 min: 2 layouts x (start + 3 alphas x ~3 min searches);
# a lease ends after 30 min held, so start it on a fresh machine), so it starts in its own
# process session (setsid: it outlives the call that started it) from a copy of the code in /tmp, and later calls
# wait for it. Carry ["devcarry/ray", "devcarry/tok"] on the first call (tests/gpu/run_serve_8b.sh says what
# devcarry/tok is). From the repository root:
#
#   call 1:      bash tests/gpu/run_multigpu.sh start 540 --gpus 8 --models 4    # nvidia-h100-x8
#                bash tests/gpu/run_multigpu.sh start 540 --gpus 4 --models 2    # nvidia-h100-x4
#   later calls: bash tests/gpu/run_multigpu.sh wait 540
#   (python3 -m experiments.serving_multigpu --gpus 8 --models 4 --dry-run prints the plan first, on any machine)
#
# Both wait up to their SECONDS for it to finish, print its progress and copy serving-multigpu.{json,md} and a
# tarball of the YAMLs, loadgen records and logs to $OUT.
set -u
MG=/tmp/mg
export PYTHONPATH=/tmp/mg-src:/tmp/site PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 \
    TOKENIZERS_PARALLELISM=false

wait_for() {
    deadline=$(($(date +%s) + $1))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        grep -q "wrote .*serving-multigpu.json\|^Traceback" "$MG/driver.log" && break
        sleep 10
    done
    grep -v "^\s*$" "$MG/driver.log" | grep -v "^  \|^|" | tail -n 40
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    [ -n "${OUT:-}" ] || return 0
    cp "$MG"/out/serving-multigpu.json "$MG"/out/serving-multigpu.md "$OUT"/ 2>/dev/null
    tar -czf "$OUT"/mg-records.tar.gz --exclude='*.safetensors' -C "$MG" out driver.log 2>/dev/null
    ls -la "$OUT"
}

case "${1:-}" in
start)
    wait_s=${2:?start WAIT_SECONDS [flags]}
    shift 2
    source devcarry/ray/setup.sh > /dev/null || exit 1
    rm -rf /tmp/mg-src "$MG" && mkdir -p /tmp/mg-src "$MG" /tmp/tok && cp -r sunray loadgen experiments /tmp/mg-src/ \
        && cp devcarry/tok/* /tmp/tok/
    cd /tmp/mg-src || exit 1
    setsid nohup python3 -m experiments.serving_multigpu --tokenizer /tmp/tok --out "$MG/out" "$@" \
        > "$MG/driver.log" 2>&1 < /dev/null &
    echo "started pid $!"
    cd - > /dev/null && wait_for "$wait_s"
    ;;
wait)
    wait_for "${2:-500}"
    ;;
*)
    echo "usage: $0 start WAIT_SECONDS [serving_multigpu flags] | wait SECONDS" >&2
    exit 2
    ;;
esac
