# Two entry points do all the set-up: `make sweep` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SWEEP_ARGS ?= --ratios 1,5,10 --baseline --shared-burn-in

.PHONY: sweep test bench browser-check monitor lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

sweep: $(STAMP)
	$(BIN)/python experiments/fold_sweep.py $(SWEEP_ARGS)

# Two test processes: the Ray tests spend much of their time starting processes, so two
# overlap well on 2 cores. The tests marked slow run first (tests/conftest.py), handed out
# one at a time, so that the short ones fill the gaps and both processes end together.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist load --maxschedchunk 1 tests

# The MLflow UI and Ray dashboard in headless Chromium (apt install chromium first); the
# screenshots land in docs/ for the README.
browser-check: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,browser]"
	SOFTTEACHER_SCREENSHOTS=docs $(BIN)/python -m pytest -q -m browser tests/test_browser.py

# Prometheus on the latest sweep's Ray cluster (apt install prometheus first)
monitor: $(STAMP)
	$(BIN)/python experiments/monitor.py

# The benchmarks a change is measured with (experiments/benchmark.py; `curve` trains for long)
BENCHMARKS ?= speed profile stream platform
bench: $(STAMP)
	for name in $(BENCHMARKS); do $(BIN)/python experiments/benchmark.py $$name || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check platform kernels experiments tests

clean:
	rm -rf $(VENV) build *.egg-info
