# `make demo` and `make test` work from a clean clone: they create .venv, install the pinned stack
# (requirements/cpu-ci.txt) and build the project (divfast._C, CPU + CUDA kernels when nvcc exists).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.divfast-installed
SOURCES := setup.py pyproject.toml requirements/cpu-ci.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: demo test bench build clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --quiet -r requirements/cpu-ci.txt
	MAX_JOBS=2 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/divfast demo

test: $(STAMP)
	DIVFAST_REQUIRE_EXTENSION=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -r requirements/bench.txt
	$(PY) -m benchmarks.bench_pair_counts
	$(PY) -m benchmarks.bench_corruptions
	$(PY) -m benchmarks.bench_attribution
	$(PY) -m benchmarks.bench_cka
	$(PY) -m benchmarks.bench_sweep --loop-subsets 12 --vectorised-subsets 12 --reps 1
	$(PY) -m benchmarks.bench_sweep_e2e

clean:
	rm -rf build divfast/_C*.so divfast/_build_info.py *.egg-info
