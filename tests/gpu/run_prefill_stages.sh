#!/usr/bin/env bash
# Issue 13 item 1: where the time to first token goes on deployments/gpu-8b.yaml (one GPU: two prefill replicas
# and the decode worker share it, KV over CUDA IPC), rate by rate, with and without CUDA MPS.
#
# For each variant (plain: GPU time-slicing between the processes, as gpu-8b.yaml runs by default; mps: the same
# under an MPS control daemon started and stopped here, with its own pipe and log directories) it starts the
# config, sends Poisson load with loadgen (2 models, 256 in / 128 out) at each rate of RATES for DURATION s, and
# after each rate reads /sunray/status?reset_stages=1: the stage percentiles (ingress, handle, queue, engine,
# send) of that rate alone. At SPY_RATE (32) req/s it also records 8 s of py-spy of a prefill replica and of an
# ingress replica (raw collapsed stacks). A variant named mps-ingress2 (or plain-ingress2) runs 2 ingress replicas.
#
# Carry ["devcarry/ray", "devcarry/tok"] (or run call 0 first); from the repository root:
#   OUT=/some/dir bash tests/gpu/run_prefill_stages.sh [plain mps]
# Writes $OUT/stages.json (every rate's loadgen summary line and stages), $OUT/stages.txt (the table), the py-spy
# profiles, the server logs and each rate's loadgen records (tar). The GPU's compute mode, clocks and MIG are never
# changed.
set -u
OUT=${OUT:?set OUT}
VARIANTS=${*:-plain mps}
RATES=${RATES:-16 32 48}
DURATION=${DURATION:-12}
SPY_RATE=${SPY_RATE:-32}  # the rate at which 8 s of py-spy of a prefill replica and of an ingress replica are taken
# (SPY_TITLES: other process titles instead, e.g. "ProxyActor ServeReplica:sunray:Ingress")
[ -f devcarry/ray/setup.sh ] && source devcarry/ray/setup.sh > /dev/null
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PATH=/tmp/site/bin:$PATH  # py-spy, from the carried wheels
[ -d devcarry/tok ] && mkdir -p /tmp/tok && cp devcarry/tok/* /tmp/tok/
sed "s#tokenizer: default#tokenizer: /tmp/tok#" deployments/gpu-8b.yaml > /tmp/gpu-8b.yaml
# A variant is [old-](plain|mps)[-ingressN][-siN][-grpc]: -ingressN runs N ingress replicas (the ingress and handle
# stages share one event loop with the token fan-out: see docs/results/serving-capacity.md; /sunray/status then
# reports the stages of whichever replica answers it, about 1/N of the requests); -siN streams at most N tokens per
# chunk (the ingress's stream_interval, instead of the config's 8); -grpc runs Serve's calls between deployments and
# from the proxy over gRPC (RAY_SERVE_USE_GRPC_BY_DEFAULT=1: 15% less serving CPU per request on the CPU machine);
# old- runs the sunray of devcarry/old.tgz (made here with `git archive REV sunray | gzip > devcarry/old.tgz`), for a
# before/after in one call.
yaml_for() {
    local v=$1 n s
    cp /tmp/gpu-8b.yaml "/tmp/gpu-8b-$v.yaml"
    n=$(grep -o -- '-ingress[0-9]*' <<< "$v" | tr -dc 0-9)
    s=$(grep -o -- '-si[0-9]*' <<< "$v" | tr -dc 0-9)
    # the variant's interval, not the config's; and none for old- (a sunray before stream_interval refuses the key)
    if [ -n "$s" ] || [ "${v%%-*}" = old ]; then sed -i '/^      stream_interval:/d' "/tmp/gpu-8b-$v.yaml"; fi
    for kv in ${n:+ingress_replicas:$n} ${s:+stream_interval:$s}; do
        sed -i "s#      decode_app: sunray-decode#      decode_app: sunray-decode\n      ${kv%%:*}: ${kv#*:}#" \
            "/tmp/gpu-8b-$v.yaml"
    done
}
if [ -f devcarry/old.tgz ]; then rm -rf /tmp/old && mkdir -p /tmp/old && tar xzf devcarry/old.tgz -C /tmp/old; fi
MPS_DIR=/tmp/sunray-mps-stages
mkdir -p "$OUT/logs"
echo "[]" > /tmp/stages.json
ready() {
    for m in llama8b-math llama8b-code; do
        curl -sf -m 20 http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
            -d "{\"model\": \"$m\", \"prompt\": \"hi\", \"max_tokens\": 1}" > /dev/null 2>&1 || return 1
    done
}
for variant in $VARIANTS; do
    yaml_for "$variant"
    if [ "${variant%%-*}" = old ] && [ ! -d /tmp/old/sunray ]; then echo "$variant: no devcarry/old.tgz: skipping"; continue; fi
    mode=${variant#old-}; mode=${mode%%-*}
    if [ "$mode" = mps ]; then
        mkdir -p "$MPS_DIR/pipe" "$MPS_DIR/log"
        export CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_DIR/log
        nvidia-cuda-mps-control -d || { echo "no MPS daemon: skipping"; continue; }
    fi
    start=$(date +%s)
    here=$PWD
    if [ "${variant%%-*}" = old ]; then  # the package of before, from its own directory (cwd comes first)
        cd /tmp/old
    fi
    grpc=0; case "$variant" in *-grpc*) grpc=1 ;; esac
    RAY_SERVE_USE_GRPC_BY_DEFAULT=$grpc PYTHONPATH=/tmp/site:$PWD setsid python3 -c "from ray.serve.scripts import cli; cli()" run --address local \
        "/tmp/gpu-8b-$variant.yaml" > "$OUT/logs/serve-$variant.log" 2>&1 &
    pid=$!
    cd "$here"
    for _ in $(seq 1 40); do sleep 4; ready && break; kill -0 $pid 2>/dev/null || break; done
    echo "$variant: ready after $(( $(date +%s) - start )) s"
    for rate in $RATES; do
        curl -s "http://127.0.0.1:8000/sunray/status?reset_stages=1" > /dev/null
        spies=()
        if [ "$rate" = "$SPY_RATE" ] && command -v py-spy > /dev/null; then
            for title in ${SPY_TITLES:-ServeReplica:sunray:Prefill-llama8b-math ServeReplica:sunray:Ingress}; do
                p=$(pgrep -f "ray::$title" | head -1)
                [ -n "$p" ] && (sleep 4; py-spy record -r 200 -d 8 -p "$p" --format raw -o "$OUT/logs/pyspy-${title##*:}.txt" \
                    > /dev/null 2>&1; echo "py-spy $title: $([ -s "$OUT/logs/pyspy-${title##*:}.txt" ] && echo ok || echo none)") &
                spies+=($!)
            done
        fi
        line=$(python3 -m loadgen run --url http://127.0.0.1:8000 --models llama8b-math llama8b-code --alpha 0 \
            --rate "$rate" --input-len 256 --output-len 128 --duration "$DURATION" --drain-timeout 30 \
            --num-requests 2000 --num-gpus 1 --timeout 120 --seed 0 --no-progress --out "/tmp/load-$variant-$rate" 2>&1 \
            | grep "all")
        for s in "${spies[@]}"; do wait "$s"; done
        cp -r "/tmp/load-$variant-$rate" "$OUT/logs/"  # the request records: `loadgen sim validate --live` replays them
        curl -s "http://127.0.0.1:8000/sunray/status?reset_stages=1" > "/tmp/status-$variant-$rate.json"
        python3 - "$variant" "$rate" "$line" <<'PY'
import json, sys
variant, rate, line = sys.argv[1], float(sys.argv[2]), sys.argv[3]
status = json.load(open(f"/tmp/status-{variant}-{sys.argv[2]}.json"))
rows = json.load(open("/tmp/stages.json"))
rows.append({"variant": variant, "rate": rate, "loadgen": line.strip(), "stages": status["prefill_stages"],
             "batch_mean": status["prefill_batch_mean"], "placements": status.get("placements"),
             "step_times": {w: v["step_times"] for w, v in status["router"]["workers"].items()}})
json.dump(rows, open("/tmp/stages.json", "w"), indent=1)
st = status["prefill_stages"]
print(f"{variant:>5} {rate:>5.0f} req/s | " + " ".join(f"{k} {v['p50_ms']:.1f}/{v['p99_ms']:.1f}" for k, v in st.items())
      + f" | batch {status['prefill_batch_mean']} | {line.strip()[:150]}", flush=True)
PY
    done
    kill -TERM $pid; for _ in $(seq 1 20); do kill -0 $pid 2>/dev/null || break; sleep 1; done; kill -KILL $pid 2>/dev/null
    sleep 2
    if [ "$mode" = mps ]; then
        echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
done
cp /tmp/stages.json "$OUT/stages.json"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
python3 -c "
import json
for r in json.load(open('$OUT/stages.json')):
    st = r['stages']
    print(f\"{r['variant']:>5} {r['rate']:>4.0f}/s \" + ' '.join(f\"{k}={v['p50_ms']:.0f}/{v['p99_ms']:.0f}\" for k, v in st.items()) + f\" b={r['batch_mean']}\")
    print('      ', r['loadgen'][:200])
" | tee "$OUT/stages.txt"
