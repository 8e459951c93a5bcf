# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv if it is missing. Run everything from the repository root (see docs/architecture.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo testbed bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	@touch $@

# The whole suite, slow tests included (they are marked `slow`; `make test-fast` leaves them out), on two pytest-xdist
# workers, one test file at a time each (tests/conftest.py: one thread per worker, the files with the most slow tests
# first). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: venv
	$(BIN)/python -m pytest $(XDIST) --durations=15

test-fast: venv
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

# The main job on the embedded CPU default (launch/demo.py): on the committed testbed base (models/testbed, a small
# Llama pretrained at a native 256 tokens), PI, NTK-aware, NTK-by-parts and YaRN at s=4, each training-free and LoRA
# fine-tuned under DeepSpeed with 2 CPU processes, perplexity and passkey at 1x-8x, the table and the plots.
demo: venv
	$(BIN)/python -m launch.demo

# Rebuild the testbed base from scratch into runs/testbed/model (launch/testbed.py; `python -m launch.testbed
# --install` then replaces the committed models/testbed).
testbed: venv
	$(BIN)/python -m launch.testbed

# The three benchmarks of docs/benchmarks.md at their default settings, in order (about 19 minutes on 2 quiet
# cores): training speed and memory against transformers Trainer + peft, the longest seq_len under a memory cap,
# perplexity-scoring throughput. Each prints its figures last; the JSON records go to runs/bench/.
bench: venv
	$(BIN)/python bench/train_throughput.py --out runs/bench/train_throughput.json
	$(BIN)/python bench/max_seq_len.py --out runs/bench/max_seq_len.json
	$(BIN)/python bench/eval_throughput.py

clean-venv:
	rm -rf $(VENV)
