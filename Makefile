# prsgd_hvd — every target sets up what it needs (.venv/, Horovod, the compiled kernels) first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
NP      ?= 2
HVDRUN  := PATH=$(CURDIR)/$(VENV)/bin:$$PATH horovodrun -np $(NP) -H localhost:$(NP) --gloo
PYTEST_ARGS ?=

.PHONY: setup test demo check-cuda check-cmake bench bench-e2e reproduce clean gpu-check gpu-check-prepare

setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest tests -q -ra --timeout=600 $(PYTEST_ARGS)

demo: setup
	$(HVDRUN) $(PY) examples/quickstart.py

# The CUDA kernels compile with nvcc here even where nothing CUDA can run.
check-cuda:
	bash scripts/check_cuda_compile.sh

# On a GPU machine, offline: Horovod from .gpu_carry/, the extension for the local GPU, the CUDA
# tests, compute-sanitizer, bench_kernels --device cuda, a horovodrun job; one summary.
# Run gpu-check-prepare first where there is network, and carry .gpu_carry/ along.
gpu-check:
	bash scripts/gpu_check.sh

gpu-check-prepare:
	bash scripts/gpu_check.sh --prepare

# The same extension built through CMake + find_package(Torch).
check-cmake: setup
	bash scripts/check_cmake_build.sh

# One averaging round, fused kernels vs the unfused torch path, against a copy_ ceiling.
bench: setup
	$(PY) benchmarks/bench_kernels.py --device cpu --threads 2

# End-to-end steps/s and bytes: DistributedLocalSGD vs hvd.DistributedOptimizer vs torch-style averaging.
bench-e2e: setup
	$(HVDRUN) $(PY) benchmarks/bench_e2e.py

# The paper's claims on a tanh MLP with real horovodrun workers (N = 1, 2, 4, 8): about 11 minutes on
# 2 cores. Writes docs/REPRODUCTION.md and docs/repro_*.png. matplotlib is needed only here.
reproduce: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(VENV)/bin/pip install matplotlib
	$(PY) scripts/reproduce.py

clean:
	rm -rf build dist *.egg-info prsgd_hvd/_C*.so $(VENV)
