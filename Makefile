# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv if it is missing. Run everything from the repository root (see README: Layout).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	@touch $@

# The whole suite, slow tests included (they are marked `slow`; `make test-fast` leaves them out).
test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

demo: venv
	@echo "make demo: the trainer (train.py) is not built yet; nothing to run." >&2
	@exit 1

clean-venv:
	rm -rf $(VENV)
