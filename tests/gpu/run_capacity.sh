#!/usr/bin/env bash
# Issue 13 on one GPU: capacity at TPOT SLO 20 and 40 ms, SUN (one decode worker) against conventional serving (one
# decode worker per model, each a CUDA MPS client at 100/M % of the SMs), live through Serve and HTTP, with the
# Llama-3.1-8B shape and dummy weights (python -m experiments.serving_capacity; its docstring says what and why).
#
# Two device calls of at most 9 minutes each, from the repository root, on one warm machine:
#   call 0 (earlier, once per machine): carry ["devcarry/ray", "devcarry/tok"]:
#            source devcarry/ray/setup.sh && mkdir -p /tmp/tok && cp devcarry/tok/* /tmp/tok/
#   call 1:  bash tests/gpu/run_capacity.sh part1    # M = 2: sun-2, conv-2                      (about 8.5 min)
#            (more flags go to the driver, e.g. `--transport object_store` should CUDA IPC fail under MPS)
#   call 2:  bash tests/gpu/run_capacity.sh part2    # M = 4 where it fits (an H200), then M = 2 again: qsun-2
#                                                    # (recorded as not run until serving has the int4 key),
#                                                    # sun-2, conv-2: repeats, so the noise is measured (8.5 min)
# (devcarry/tok: the SmolLM2 tokenizer files, config.json, tokenizer*.json, chat_template.jinja, of the converted
# default model; tests/gpu/run_serve_8b.sh uses the same. Carrying it in call 1 instead of call 0 works too.)
#
# Each call writes to $OUT (8 files at most come back): capacity-PART.json and .md (the driver's report),
# capacity-PART-records.tgz (YAMLs, server and loadgen logs, every probe's request records, /sunray/status, the
# simulator's searches), driver-PART.log and gpu-PART.txt (nvidia-smi before and after). Then, on the CPU machine:
#   python -m experiments.serving_capacity --report capacity-part1.json capacity-part2.json \
#       --out docs/results/serving-capacity
# The MPS control daemon is started and stopped by the driver with its own pipe and log directories under
# /tmp/sunray-mps (this script only quits a daemon of that pipe left by an interrupted call); the GPU's compute
# mode, clocks and MIG are never changed.
set -u
part=${1:?usage: $0 part1|part2 [more serving_capacity flags, e.g. --transport object_store]}
shift
OUT=${OUT:?set OUT}
[ -f devcarry/ray/setup.sh ] && source devcarry/ray/setup.sh > /dev/null
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import ray, ray.serve" 2> /dev/null || { echo "no Ray in /tmp/site: run call 0 first"; exit 2; }
[ -d devcarry/tok ] && mkdir -p /tmp/tok && cp devcarry/tok/* /tmp/tok/
[ -f /tmp/tok/tokenizer.json ] || { echo "no tokenizer in /tmp/tok: carry devcarry/tok (see the header)"; exit 2; }
MPS_DIR=/tmp/sunray-mps
quit_stale_mps() {  # only a daemon of our own pipe directory, left by an interrupted call
    if [ -S "$MPS_DIR/pipe/control" ] || [ -e "$MPS_DIR/pipe/control" ]; then
        echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_DIR/log \
            timeout 20 nvidia-cuda-mps-control > /dev/null 2>&1
        sleep 1
    fi
}
quit_stale_mps
echo "nvidia-cuda-mps-control: $(command -v nvidia-cuda-mps-control || echo MISSING: conventional layouts will not run)"
nvidia-smi --query-gpu=name,memory.total,memory.used,compute_mode --format=csv > "$OUT/gpu-$part.txt" 2>&1
cat "$OUT/gpu-$part.txt"
case "$part" in
part1*) flags=(--models 2 --layouts sun conv) ;;  # part1b, ...: a later call of the same plan (narrow it with --layouts)
part2*) flags=(--models 4 2 --layouts sun conv qsun) ;;
*) echo "usage: $0 part1[SUFFIX]|part2[SUFFIX]" >&2; exit 2 ;;
esac
work=/tmp/capacity-$part
rm -rf "$work"
start=$(date +%s)
# DEADLINE (470 s) for the driver's own plan; timeout only as a backstop (SIGTERM: the driver stops its servers and
# MPS). A call that also unpacks the Ray bundle first gives it less (DEADLINE=420).
DEADLINE=${DEADLINE:-470}
timeout -k 20 $((DEADLINE + 45)) python3 -m experiments.serving_capacity --tokenizer /tmp/tok --tag "capacity-$part" \
    --out "$work" --deadline-s "$DEADLINE" --mps-dir "$MPS_DIR" "${flags[@]}" "$@" > "$OUT/driver-$part.log" 2>&1
rc=$?
echo "driver exit $rc after $(( $(date +%s) - start )) s"
quit_stale_mps
grep -v "^\s*$" "$OUT/driver-$part.log" | grep -v "^|" | tail -n 30
cp "$work/capacity-$part.json" "$work/capacity-$part.md" "$OUT/" 2> /dev/null
tar -czf "$OUT/capacity-$part-records.tgz" --exclude='*.safetensors' -C /tmp "capacity-$part" 2> /dev/null
nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/gpu-$part.txt" 2>&1
ls -la "$OUT"
exit $rc
