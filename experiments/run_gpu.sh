#!/usr/bin/env bash
# Issue 5 on the GPU machine, in one call (no Ray, no HTTP: the real engine in one process). From the repository root:
#     OUT=/some/dir bash experiments/run_gpu.sh
# (a) the single-GPU consolidation experiment: M = 2, 4, 8 task models of the Llama-3.1-8B shape (dummy weights),
#     conventional (one engine and weight copy per model, round-robin) vs SUN (one shared engine and copy)
#     -> $OUT/serving-gpu.json, $OUT/serving-gpu.md                       (about 2-4 minutes on an H100)
# (b) the simulator's step-time profile of that shape on this GPU
#     -> $OUT/h100-llama-3.1-8b-measured.json (h200-... on an H200)         (about 1-2 minutes)
# Logs: $OUT/consolidation.log, $OUT/profile.log, $OUT/nvidia-smi.txt. Needs python3 with torch, triton,
# transformers, safetensors, msgpack, numpy. SKIP_CONSOLIDATION=1 or SKIP_PROFILE=1 skips a part.
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output directory}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,power.limit --format=csv \
    2>&1 | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/nvidia-smi.txt"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
    *H200*) gpu=h200 ;;
    *H100*) gpu=h100 ;;
    *) gpu=gpu ;;
esac
start=$(date +%s)
rc_a=0
rc_b=0
if [ "${SKIP_CONSOLIDATION:-0}" != 1 ]; then
    $PY -m experiments.consolidation_gpu --shape llama-3.1-8b --models 2 4 8 \
        --batch-sizes 1 2 4 8 16 32 64 128 256 --context 1024 --steps 20 --warmup 3 --slo-ms 20 30 50 100 \
        --device cuda --out "$OUT" 2>&1 | tee "$OUT/consolidation.log"
    rc_a=${PIPESTATUS[0]}
    echo "consolidation: exit code $rc_a after $(( $(date +%s) - start )) s"
fi
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
    t=$(date +%s)
    $PY -m experiments.measure_profile --shape llama-3.1-8b --device cuda \
        --batch-sizes 1 8 16 32 64 128 256 --context 256 512 1024 2048 --prompt-len 128 256 512 1024 2048 \
        --steps 16 --out "$OUT/$gpu-llama-3.1-8b-measured.json" 2>&1 | tee "$OUT/profile.log"
    rc_b=${PIPESTATUS[0]}
    echo "profile: exit code $rc_b after $(( $(date +%s) - t )) s"
fi
echo "consolidation exit code $rc_a, profile exit code $rc_b; total $(( $(date +%s) - start )) s" | tee -a "$OUT/nvidia-smi.txt"
[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ]
