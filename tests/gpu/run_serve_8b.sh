#!/usr/bin/env bash
# deployments/gpu-8b.yaml on the lent GPU machine, in one call (issue 4: "each config works with serve run, and
# serve status shows it healthy"). Carry ["devcarry/ray", "devcarry/tok"]: Ray (../shared/device/make-carry.sh)
# and the SmolLM2 tokenizer files (config.json, tokenizer*.json, chat_template.jinja from the converted default
# model), which the dummy-weight config borrows. From the repository root: OUT=/some/dir bash tests/gpu/run_serve_8b.sh
set -u
OUT=${OUT:?set OUT}
source devcarry/ray/setup.sh
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p /tmp/tok && cp devcarry/tok/* /tmp/tok/
sed "s#tokenizer: default#tokenizer: /tmp/tok#" deployments/gpu-8b.yaml > /tmp/gpu-8b.yaml
serve() { python3 -c "from ray.serve.scripts import cli; cli()" "$@"; }
start=$(date +%s)
setsid python3 -c "from ray.serve.scripts import cli; cli()" run --address local /tmp/gpu-8b.yaml > "$OUT/serve-run.log" 2>&1 &
pid=$!
healthy=0
ready() {  # every model answers a one-token completion (the HTTP ingress is up before the engines are)
    for m in llama8b-math llama8b-code; do
        curl -sf -m 20 http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
            -d "{\"model\": \"$m\", \"prompt\": \"hi\", \"max_tokens\": 1}" > /dev/null 2>&1 || return 1
    done
}
for _ in $(seq 1 60); do
    sleep 5
    if ready; then healthy=1; break; fi
    kill -0 $pid 2>/dev/null || break
    grep -q OutOfMemoryError "$OUT/serve-run.log" && { echo "out of GPU memory:"; grep -m1 OutOfMemoryError "$OUT/serve-run.log"; break; }
done
echo "ready: $healthy after $(( $(date +%s) - start )) s"
serve status 2>&1 | tee "$OUT/serve-status.txt" | head -60
python3 - <<'PY' 2>&1 | tee "$OUT/requests.txt"
import json, time, urllib.request
def post(path, body, stream=False):
    req = urllib.request.Request("http://127.0.0.1:8000" + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        if not stream:
            return json.loads(r.read()), time.perf_counter() - t0
        first, chunks = None, 0
        for line in r:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunks += 1
                first = first or time.perf_counter() - t0
        return {"chunks": chunks, "ttft_s": round(first or -1, 3)}, time.perf_counter() - t0
print(urllib.request.urlopen("http://127.0.0.1:8000/v1/models").read().decode()[:400])
for model in ("llama8b-math", "llama8b-code"):
    r, dt = post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 64, "temperature": 0})
    print(model, "usage", r["usage"], f"{dt:.2f} s", "finish", r["choices"][0]["finish_reason"])
r, dt = post("/v1/completions", {"model": "llama8b-math", "prompt": "x " * 1000, "max_tokens": 128, "stream": True}, stream=True)
print("stream 1k prompt, 128 tokens:", r, f"{dt:.2f} s total")
r = json.loads(urllib.request.urlopen("http://127.0.0.1:8000/sunray/status").read())
print("sunray status:", json.dumps(r)[:800])
PY
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "nope", "prompt": "x"}' | head -c 300; echo
# Issue 5's simulator validation: a rate sweep over HTTP, one loadgen run per rate (replayed through `loadgen sim
# validate` afterwards), and after each the decode worker's own step times (cumulative, in the router's status),
# from which `loadgen sim calibrate` makes an in-situ profile. LOAD_RATES="" skips it.
LOAD_RATES=${LOAD_RATES-8 32 64}
if [ -n "$LOAD_RATES" ]; then
    for rate in $LOAD_RATES; do
        python3 -m loadgen run --url http://127.0.0.1:8000 --models llama8b-math llama8b-code --alpha "${LOAD_ALPHA:-0}" \
            --rate "$rate" --input-len 256 --output-len 128 --duration 15 --drain-timeout 30 --num-requests 1000 \
            --num-gpus 1 --timeout 120 --seed "${LOAD_SEED:-0}" --no-progress --out "$OUT/load/rate-$rate" 2>&1 | grep "all"
        curl -s http://127.0.0.1:8000/sunray/status > "$OUT/load/status-after-rate-$rate.json"
    done
    tar czf "$OUT/load.tgz" -C "$OUT" load && rm -rf "$OUT/load"
fi
kill -TERM $pid; sleep 8; kill -0 $pid 2>/dev/null && kill -KILL $pid
echo "total $(( $(date +%s) - start )) s"
