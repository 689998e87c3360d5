#!/usr/bin/env bash
# Issue 15 item 3: the math-gap tries of docs/results/accuracy.md, side by side on one GPU, each its own experiment
# (tests/gpu/run_accuracy.sh with RUN=acc-<try>: its own work dir, its own report). Every try trains and tests its
# own methods on the same math data and seeds, so each try's test accuracy stands alone (a sweep inside one
# experiment would report only the learning rate that validation kept); `ref` is full FT and plain SUN in the same
# call, the reference every try is read against.
#
#   call 1, carry ["devcarry/model1", "devcarry/bench"]:  bash tests/gpu/run_accuracy.sh stage
#   call 2, carry ["devcarry/model2"]:  bash tests/gpu/run_math_gap.sh start [SEEDS...]    # default: 0 1
#   later calls:                        OUT=$OUT bash tests/gpu/run_math_gap.sh wait SECONDS
#
# TRIES_ONLY names the tries to run (default: those not run yet), e.g. TRIES_ONLY="ref long".
# `wait` polls every try until all are done or SECONDS have passed, then packs each try's report and records into
# $OUT/math-gap.tar.gz (acc-<try>/accuracy.{md,json}, acc-records.tar.gz) and prints the math rows.
set -u
here=$(cd "$(dirname "$0")" && pwd)
declare -A TRIES=(
    [ref]="--tasks math --methods full sun --method-lrs full=1e-4 sun=3e-4"
    [long]="--tasks math --methods sun --method-lrs sun=3e-4 --method-train sun:steps=1800,warmup_steps=100"
    [lr1e-3]="--tasks math --methods sun --method-lrs sun=1e-3"
    [rank]="--tasks math --methods lora_sun --method-train lora_sun:lora_rank=128,lora_alpha=256"
    [ranklong]="--tasks math --methods lora_sun --method-train lora_sun:lora_rank=128,lora_alpha=256,steps=1200,warmup_steps=100"
    # not run yet (2026-12-08): three solved train problems before each prompt, for full FT and SUN alike; LoRA-SUN
    # at its default rank 16 and at 64, between the default and the best so far (128)
    [fewshot]="--tasks math-fewshot3 --methods full sun --method-lrs full=1e-4 sun=3e-4"
    [rank16]="--tasks math --methods lora_sun"
    [rank64]="--tasks math --methods lora_sun --method-train lora_sun:lora_rank=64,lora_alpha=128"
)
# the tries of 2026-12-08 (docs/results/accuracy.md) were ref long lr1e-3 rank, then ranklong alone
names=(${TRIES_ONLY:-fewshot rank16 rank64})
for n in "${names[@]}"; do
    [ -n "${TRIES[$n]:-}" ] || { echo "unknown try $n; tries: ${!TRIES[*]}" >&2; exit 2; }
done

case "${1:-}" in
start)
    shift
    seeds=${*:-0 1}
    n_seeds=$(wc -w <<< "$seeds")
    for n in "${names[@]}"; do
        # room for all of a try's jobs at once (two methods per seed at most, and the base model's evaluation)
        RUN=acc-$n START_WAIT=2 bash "$here/run_accuracy.sh" start --seeds $seeds \
            --jobs-per-gpu $((2 * n_seeds + 1)) ${TRIES[$n]} | head -n 1
    done
    sleep 60
    for n in "${names[@]}"; do echo "== $n"; tail -n 3 "/tmp/acc-$n/driver.log"; done
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    ;;
wait)
    deadline=$(($(date +%s) + ${2:-500}))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        left=0
        for n in "${names[@]}"; do
            grep -q "wrote .*accuracy.json\|Traceback\|job(s) failed" "/tmp/acc-$n/driver.log" 2>/dev/null || left=1
        done
        [ $left = 0 ] && break
        sleep 10
    done
    # Every try's report and records into one tarball ($OUT brings back 8 files at most), its table printed here.
    for n in "${names[@]}"; do
        echo "== $n"
        OUT=/tmp/math-gap-out RUN=acc-$n bash "$here/run_accuracy.sh" wait 0 | grep -v "^[-d]r" | tail -n 6
        grep "^| math" "/tmp/math-gap-out/acc-$n/accuracy.md" 2>/dev/null  # math and math-fewshot3
    done
    [ -z "${OUT:-}" ] || tar -czf "$OUT/math-gap.tar.gz" -C /tmp/math-gap-out .
    ;;
*)
    echo "usage: $0 start [SEEDS...] | wait SECONDS" >&2
    exit 2
    ;;
esac
