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
for _ in $(seq 1 60); do
    sleep 5
    if curl -sf http://127.0.0.1:8000/v1/models > /dev/null 2>&1; then healthy=1; break; fi
    kill -0 $pid 2>/dev/null || break
done
echo "HTTP up: $healthy after $(( $(date +%s) - start )) s"
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
kill -TERM $pid; sleep 8; kill -0 $pid 2>/dev/null && kill -KILL $pid
echo "total $(( $(date +%s) - start )) s"
