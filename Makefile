# prsgd_hvd — every target sets up what it needs (.venv/, Horovod, the compiled kernels) first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
NP      ?= 2
HVDRUN  := PATH=$(CURDIR)/$(VENV)/bin:$$PATH horovodrun -np $(NP) -H localhost:$(NP) --gloo
PYTEST_ARGS ?=

.PHONY: setup test demo check-cuda check-cmake bench clean

setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest tests -q -ra --timeout=600 $(PYTEST_ARGS)

demo: setup
	$(HVDRUN) $(PY) examples/quickstart.py

# The CUDA kernels compile with nvcc here even where nothing CUDA can run.
check-cuda:
	bash scripts/check_cuda_compile.sh

# The same extension built through CMake + find_package(Torch).
check-cmake: setup
	bash scripts/check_cmake_build.sh

bench: setup
	$(PY) benchmarks/bench_kernels.py --device cpu --threads 2

clean:
	rm -rf build dist *.egg-info prsgd_hvd/_C*.so $(VENV)
