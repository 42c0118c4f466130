# Two commands do everything on a fresh machine: `make demo` and `make test` (both set up .venv when needed).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= It is a truth universally acknowledged

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (pocketllm needs Python 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/pocketllm generate --checkpoint models/tiny-austen --prompt "$(PROMPT)" --greedy --max-new-tokens 80

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build out .pytest_cache
