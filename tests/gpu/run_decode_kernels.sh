#!/usr/bin/env bash
# Issue 16 items 1-2: where a decode step's time goes, bf16 and int4-g128, on the Llama-3.1-8B shape with dummy
# weights: `sunray bench decode --kernels` prints each row (ms/step, the floor from the measured copy bandwidth,
# step/floor) and under it the step's kernels by family (launches per step and per layer, microseconds, and the gap
# between the graph replay's wall time and the sum of its kernels). Needs only the GPU image (torch, triton,
# transformers, safetensors): no Ray. From the repository root:
#     OUT=/some/dir bash tests/gpu/run_decode_kernels.sh        # about 2 minutes on an H100
# Writes $OUT/decode-kernels-{bf16,int4}.{txt,json}, then the overlapped-step A/B ($OUT/decode-overlap-{off,on}.*:
# compare the b2b ms column, steps back to back), the sampler on the 8B vocabulary ($OUT/sampler.*) and every int4
# kernel candidate ($OUT/int4-candidates.*). That is 12 files, more than a device call brings back: run it with OUT
# set to a folder of its own and tar that into the call's $OUT.
set -u
OUT=${OUT:?set OUT}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$(date +%s)
common=(bench decode --shape llama-3.1-8b --dummy-weights --device cuda --context 1024 --steps 32 --kernels)
python3 -m sunray.cli "${common[@]}" --batch-sizes 1 16 64 256 --json "$OUT/decode-kernels-bf16.json" \
    > "$OUT/decode-kernels-bf16.txt" 2>&1
echo "bf16 exit $? after $(( $(date +%s) - start )) s"
python3 -m sunray.cli "${common[@]}" --quant int4-g128 --batch-sizes 1 16 64 256 \
    --json "$OUT/decode-kernels-int4.json" > "$OUT/decode-kernels-int4.txt" 2>&1
echo "int4 exit $? after $(( $(date +%s) - start )) s"
plain=(bench decode --shape llama-3.1-8b --dummy-weights --device cuda --context 1024 --steps 64 --batch-sizes 1 64 256)
python3 -m sunray.cli "${plain[@]}" --json "$OUT/decode-overlap-off.json" > "$OUT/decode-overlap-off.txt" 2>&1
python3 -m sunray.cli "${plain[@]}" --overlap --json "$OUT/decode-overlap-on.json" > "$OUT/decode-overlap-on.txt" 2>&1
echo "overlap A/B exit $? after $(( $(date +%s) - start )) s"
python3 -m sunray.cli bench sampler --shape llama-3.1-8b --dummy-weights --device cuda --batch-sizes 1 64 256 \
    --steps 20 --json "$OUT/sampler.json" > "$OUT/sampler.txt" 2>&1
echo "sampler exit $? after $(( $(date +%s) - start )) s"
# Every int4 candidate on the 8B linears, with its share of the copy rate (the tuner prints only its pick).
python3 tests/gpu/int4_candidates.py --json "$OUT/int4-candidates.json" > "$OUT/int4-candidates.txt" 2>&1
echo "int4 candidates exit $? after $(( $(date +%s) - start )) s; ncu on this image: $(command -v ncu || echo none)"
grep -v "^USDT\|STAGE:" "$OUT"/decode-kernels-{bf16,int4}.txt "$OUT"/decode-overlap-{off,on}.txt "$OUT/sampler.txt" \
    "$OUT/int4-candidates.txt" | cut -c1-160
