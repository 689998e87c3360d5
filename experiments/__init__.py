"""Experiment drivers: they run the engine, the serving stack and the load generator, and write `docs/results`.

Drivers, not library: nothing in `sunray` or `loadgen` imports them (tests/test_layers.py). Run them from the
repository root, `python -m experiments.<name>`:
- `accuracy`: issue 3's accuracy experiment (SUN vs full FT, QSUN, LoRA-SUN; `make experiment-accuracy`).
- `bench_worker`: what streaming through a Ray decode worker costs on top of the bare engine.
- `measure_profile`: a step-time profile for the cluster simulator (`loadgen sim`) from the real engine.
- `consolidation_gpu`: one GPU, M task models, SUN's shared decode against one decode engine per model.
- `serving_cpu`, `validate_cpu`: issue 5 live on CPU against `serve run`, and the simulator held against it.
- `serving_multigpu`, `validate_gpu`: issue 7 on several GPUs, and the simulator against those runs.
- `serve_local`: `serve run CONFIG` on a fresh local Ray instance (what the serving drivers deploy with).
"""
