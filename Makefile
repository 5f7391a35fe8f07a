# hjserve: two commands do everything on a fresh machine.
#   make serve   - install, build the demo models, start the server on http://127.0.0.1:8000 (gRPC on :8001)
#   make test    - install (incl. system test tools), build the demo models, run the whole test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODELS  ?= models
HOST    ?= 127.0.0.1
PORT    ?= 8000
GRPC_PORT ?= 8001

PERF_VENV ?= .venv-perf

.PHONY: setup system-deps perf-analyzer models serve test lint bench eval perf clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned (CPU build); see pyproject.toml
	$(BIN)/pip install -q -e ".[dev,ray,tracing]"
	touch $@

# Tools the tests start or call: a real Prometheus (+promtool), docker-compose (config check), and a
# headless browser for the diagnostics page (Debian's chromium + chromedriver).
system-deps:
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus docker-compose \
	    chromium chromium-driver >/dev/null; }

# Triton's load generator, which a test drives the server with (tritonclient 2.51's binary, libb64 via apt)
perf-analyzer: $(PERF_VENV)/perf-env.sh

$(PERF_VENV)/perf-env.sh:
	bash bench/install_perf_analyzer.sh $(PERF_VENV) >/dev/null

# rebuilt when the core changes: the demo graphs are exported by hjmodel's code
$(MODELS)/DEMO_RESULTS.json: $(wildcard hjmodel/*.py) | setup
	rm -rf $(MODELS)
	$(BIN)/python -m hjmodel.demo --out $(MODELS)

models: $(MODELS)/DEMO_RESULTS.json

serve: setup models
	$(BIN)/python -m service --model-repository $(MODELS) --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT)

test: setup system-deps perf-analyzer models
	HJSERVE_TEST_MODELS=$(abspath $(MODELS)) HJSERVE_TEST_PERF_VENV=$(abspath $(PERF_VENV)) $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check hjmodel service tests bench eval examples

bench: setup models
	$(BIN)/python -m bench.run_all --models $(abspath $(MODELS))

# the evaluation against baselines (writes eval/RESULTS.md and plots; minutes)
eval: setup
	$(BIN)/pip install -q -e ".[dev,eval]"
	$(BIN)/python -m eval.run

# perf_analyzer (Triton's load generator) against a server it starts on the demo models
perf: setup models
	bash bench/perf_analyzer.sh

clean:
	rm -rf $(VENV) $(PERF_VENV) $(MODELS) .pytest_cache
