#!/usr/bin/env bash
# Everything this project can check on a GPU, in one go, with no network (make gpu-check).
#
#   scripts/gpu_check.sh --prepare   on a machine with network (here): put what the GPU machine
#                                    lacks into .gpu_carry/ (Horovod's sdist, the wheels of its
#                                    pure-Python deps for the GPU machine's Python); carry that
#                                    directory along with the tree.
#   scripts/gpu_check.sh             on the GPU machine (a CUDA torch, nvcc, cmake, ninja,
#                                    pytest; no network), within $GPU_CHECK_BUDGET seconds
#                                    (default 480; a step that would start too late is
#                                    skipped, one that runs past the budget is killed):
#     1. Horovod 0.28.1 from the carried sdist with the C++17 patch of scripts/setup_env.sh,
#        NCCL GPU operations where NCCL's headers and library are found and the machine has
#        two GPUs (NCCL refuses two ranks on one GPU), else Gloo (CUDA tensors staged through
#        host memory); installed --user unless a venv is active (skipped when
#        `import horovod.torch` already works; prsgd_hvd imports it, so it comes first);
#     2. the extension for the local GPU (TORCH_CUDA_ARCH_LIST = its compute capability),
#        built in place with setup.py;
#     3. the CUDA variants of tests/test_ops.py, the stream-race and graph-capture tests;
#     4. benchmarks/bench_kernels.py --device cuda (table in $OUT_DIR/bench_kernels_cuda.txt);
#     5. the trajectory scenarios of tests/test_trajectories.py with the model on the GPU,
#        2 ranks under horovodrun, against the float64 reference;
#     6. horovodrun -np 2 of examples/quickstart.py (which trains on the CPU: it checks this
#        Horovod build and the package end to end);
#     7. compute-sanitizer memcheck and racecheck on a subset of the op tests (last: slow).
#   and prints one summary (PASS / FAIL / SKIP with the reason per step); exit 1 if any failed.
#   scripts/gpu_check.sh --dry-run   the same script where there is no GPU: runs what does not
#                                    need one (carried files present, the Horovod patch
#                                    applies, tools found) and marks the rest SKIP.
# Output directory: $GPU_CHECK_OUT, else $OUT (the device runner's), else build/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source "$ROOT/scripts/horovod_source.sh"  # prepare_horovod_source, horovod_build_env
MODE=run
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--prepare|--dry-run]" >&2; exit 2 ;;
esac
CARRY="$ROOT/.gpu_carry"
HOROVOD_VERSION=0.28.1
PY="${PYTHON:-$(command -v python3 || command -v python)}"

if [[ "$MODE" == prepare ]]; then
  # The GPU machine's Python (3.12 as measured; GPU_PY_VERSION to change it).
  pyver="${GPU_PY_VERSION:-3.12}"
  set -e
  mkdir -p "$CARRY/wheels"
  "$PY" -m pip download -q --no-deps --no-binary=:all: "horovod==$HOROVOD_VERSION" -d "$CARRY"
  "$PY" -m pip download -q --only-binary=:all: --python-version "$pyver" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp \
    -d "$CARRY/wheels" cloudpickle==3.1.1 psutil==7.0.0 pyyaml==6.0.2 packaging==25.0 \
    cffi==1.17.1 pycparser==2.22  # cffi: Horovod's setup_requires
  ls -l "$CARRY" "$CARRY/wheels"
  echo "gpu_check --prepare: carry .gpu_carry/ to the GPU machine"
  exit 0
fi

OUT_DIR="${GPU_CHECK_OUT:-${OUT:-$ROOT/build/gpu_check}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
declare -a SUMMARY=()
FAILED=0
T0=$SECONDS

BUDGET="${GPU_CHECK_BUDGET:-480}"

# run_limited SECONDS COMMAND...: the command (a function too) in a process group of its own,
# the whole group killed at the limit, so a hung build or test cannot eat the lease.
run_limited() {
  local limit=$1; shift
  set -m
  "$@" &
  local pid=$! waited=0
  set +m
  while kill -0 "$pid" 2>/dev/null; do
    if (( waited >= limit )); then
      kill -TERM -- "-$pid" 2>/dev/null; sleep 3; kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      echo "killed: over its limit of $limit s"
      return 124
    fi
    sleep 1; waited=$((waited + 1))
  done
  wait "$pid"
}

# step NAME COMMAND...: runs it with output to the log (and the tail on failure), records a line;
# skipped when less than 30 s of the budget is left, limited to what is left.
step() {
  local name=$1; shift
  local t=$SECONDS left=$((BUDGET - (SECONDS - T0) - 10))
  if (( left < 30 )); then skip "$name" "out of time (budget $BUDGET s)"; return; fi
  echo "== $name: $*" | tee -a "$LOG"
  if run_limited "$left" "$@" >>"$LOG" 2>&1; then
    SUMMARY+=("PASS  $name ($((SECONDS - t)) s)")
  else
    local rc=$?
    SUMMARY+=("FAIL  $name (exit $rc, $((SECONDS - t)) s; see $LOG)")
    FAILED=1
    tail -n 40 "$LOG"
  fi
}
skip() { SUMMARY+=("SKIP  $1: $2"); echo "== $1: skipped: $2" | tee -a "$LOG"; }

summary() {
  echo
  echo "================ gpu_check summary ($((SECONDS - T0)) s, mode $MODE) ================"
  echo "machine: ${GPU_NAME:-no GPU}; torch ${TORCH_VERSION:-?}; CUDA ${TORCH_CUDA:-?}"
  printf '%s\n' "${SUMMARY[@]}"
  [[ -f "$OUT_DIR/bench_kernels_cuda.txt" ]] && { echo "-- bench_kernels --device cuda:"; cat "$OUT_DIR/bench_kernels_cuda.txt"; }
  echo "log: $LOG"
  exit $FAILED
}

# ---- the machine ---------------------------------------------------------------------------
read -r TORCH_VERSION TORCH_CUDA HAVE_GPU GPU_COUNT GPU_CC GPU_NAME < <("$PY" - <<'PYEOF' 2>/dev/null || echo "none none 0 0 none none"
import torch
ok = torch.cuda.is_available()
cc = "%d.%d" % torch.cuda.get_device_capability() if ok else "none"
name = torch.cuda.get_device_name().replace(" ", "_") if ok else "none"
print(torch.__version__, torch.version.cuda, int(ok), torch.cuda.device_count() if ok else 0, cc, name)
PYEOF
)
echo "gpu_check: python $("$PY" --version 2>&1), torch $TORCH_VERSION (CUDA $TORCH_CUDA), GPUs $GPU_COUNT ($GPU_NAME, cc $GPU_CC)" | tee -a "$LOG"
if [[ "$MODE" == run && "$HAVE_GPU" != 1 ]]; then
  skip "everything" "torch sees no GPU here (use --dry-run for the parts that need none)"
  FAILED=1
  summary
fi
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")}"
export CUDA_HOME


# ---- 1. Horovod (the package imports it) ---------------------------------------------------
have_horovod() { "$PY" -c "import horovod.torch" >/dev/null 2>&1; }
NCCL_HOME=""
find_nccl() {  # NCCL from the nvidia-nccl wheel torch depends on, or the system
  local d
  d=$("$PY" -c "import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])" 2>/dev/null)
  for c in "$d" /usr /usr/local/cuda; do
    if [[ -n "$c" && -f "$c/include/nccl.h" ]] && ls "$c"/lib*/libnccl.so* >/dev/null 2>&1; then
      NCCL_HOME="$c"; return 0
    fi
  done
  return 1
}
build_horovod() {
  local sdist="$CARRY/horovod-$HOROVOD_VERSION.tar.gz" work
  [[ -f "$sdist" ]] || { echo "missing $sdist (run scripts/gpu_check.sh --prepare and carry .gpu_carry/)"; return 1; }
  work=$(mktemp -d)
  if [[ "$MODE" == dry ]]; then  # the carried wheels resolve offline for the GPU machine's Python
    "$PY" -m pip download -q --no-index --find-links "$CARRY/wheels" --only-binary=:all: \
      --python-version "${GPU_PY_VERSION:-3.12}" -d "$work/dl" cloudpickle psutil pyyaml packaging cffi pycparser \
      || return 1
  elif ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$CARRY/wheels" $PIP_USER \
      cloudpickle psutil pyyaml packaging cffi pycparser || return 1
  fi
  tar -xzf "$sdist" -C "$work" || return 1
  local src="$work/horovod-$HOROVOD_VERSION"
  prepare_horovod_source "$src" || return 1
  [[ "$MODE" == dry ]] && { echo "dry run: patch applies; not building"; rm -rf "$work"; return 0; }
  horovod_build_env
  # A CUDA torch makes Horovod build its CUDA kernels, by default for every arch nvcc knows
  # (a dozen passes): this GPU's is enough.
  export HOROVOD_BUILD_CUDA_CC_LIST="${GPU_CC/./}"
  if [[ "${GPU_COUNT:-0}" -ge 2 ]] && find_nccl; then
    # Horovod's CMake looks for libnccl.so: give it a directory with that name.
    mkdir -p "$work/nccl/lib" && ln -sf "$NCCL_HOME/include" "$work/nccl/include"
    ln -sf "$(ls "$NCCL_HOME"/lib*/libnccl.so* | head -n1)" "$work/nccl/lib/libnccl.so"
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$work/nccl" HOROVOD_CUDA_HOME="$CUDA_HOME"
    echo "horovod: NCCL GPU operations ($NCCL_HOME)"
  else
    echo "horovod: Gloo only (NCCL needs two GPUs or was not found): CUDA tensors need host staging"
  fi
  "$PY" -m pip install --no-build-isolation --no-deps --no-index $PIP_USER "$src"
  local rc=$?
  rm -rf "$work"
  return $rc
}
PIP_USER=""  # --user outside a virtual environment (the GPU machine's system Python)
"$PY" -c "import sys; sys.exit(sys.prefix != sys.base_prefix)" && PIP_USER="--user"
if have_horovod && [[ "$MODE" == run ]]; then
  skip "horovod build" "horovod.torch already imports"
else
  step "horovod $HOROVOD_VERSION from the carried sdist" build_horovod
fi

# ---- 2. the extension for this GPU ----------------------------------------------------------
build_ext() {
  rm -f prsgd_hvd/_C*.so
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$GPU_CC" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace &&
    "$PY" -c "import prsgd_hvd.ops as o, torch; assert o.has_extension(), o.extension_error(); \
x = torch.ones(3, device='cuda'); assert torch.equal(o.flatten([x]), x); print('CUDA kernels load and run')"
}
if [[ "$MODE" == dry ]]; then
  skip "build the extension for the local GPU" "no GPU (dry run)"
else
  step "build the extension (TORCH_CUDA_ARCH_LIST=$GPU_CC)" build_ext
fi

# ---- 3-4. CUDA op tests, benchmark ---------------------------------------------------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PRSGD_REQUIRE_EXTENSION=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
CUDA_TESTS="cuda or stream or graph"
SANITIZER=""
for c in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" "$(command -v compute-sanitizer || true)"; do
  [[ -n "$c" && -x "$c" ]] && { SANITIZER="$c"; break; }
done
collect_cuda_tests() {  # the selection below must find the CUDA tests (they skip here)
  local n
  n=$("${PYTEST[@]}" --collect-only tests/test_ops.py -k "$CUDA_TESTS" | grep -c "::")
  echo "$n CUDA tests selected"
  [[ "$n" -gt 100 ]]
}
if [[ "$MODE" == dry ]]; then
  step "CUDA op tests are selected (collect only)" collect_cuda_tests
  skip "CUDA op tests" "no GPU (dry run)"
  skip "bench_kernels --device cuda" "no GPU (dry run)"
else
  step "CUDA op tests, stream race, graph capture" "${PYTEST[@]}" tests/test_ops.py -k "$CUDA_TESTS" -ra
  step "bench_kernels --device cuda" bash -o pipefail -c "'$PY' benchmarks/bench_kernels.py --device cuda --repeats 50 | tee '$OUT_DIR/bench_kernels_cuda.txt'"
fi

# ---- 5. the trajectories with the model on the GPU -------------------------------------------
if [[ "$MODE" == dry ]]; then
  skip "CUDA trajectories under horovodrun" "no GPU (dry run)"
elif have_horovod; then
  step "CUDA trajectories, 2 ranks under horovodrun" env PATH="$(dirname "$PY"):$HOME/.local/bin:$PATH" \
    "${PYTEST[@]}" tests/test_trajectories.py -k cuda -ra
else
  skip "CUDA trajectories under horovodrun" "horovod.torch does not import"
fi

# ---- 6. a two-process Horovod job ------------------------------------------------------------
# The quickstart trains on the CPU (it has no device option): this checks Horovod as built here
# and the package end to end, not the CUDA kernels (steps 3-5 do).
run_quickstart() {
  "$PY" -c "import horovod.torch as h; print('horovod NCCL built:', h.nccl_built())"
  PATH="$(dirname "$PY"):$HOME/.local/bin:$PATH" horovodrun -np 2 -H localhost:2 --gloo \
    "$PY" examples/quickstart.py --steps 60 --intervals 4 16
}
if [[ "$MODE" == dry ]]; then
  skip "horovodrun -np 2 quickstart" "no GPU (dry run)"
else
  step "horovodrun -np 2 examples/quickstart.py" run_quickstart
fi

# ---- 7. compute-sanitizer (last: it slows kernels 10-100x) ----------------------------------
if [[ "$MODE" == dry ]]; then
  skip "compute-sanitizer" "no GPU (dry run); found: ${SANITIZER:-none}"
elif [[ -z "$SANITIZER" ]]; then
  skip "compute-sanitizer" "not found under $CUDA_HOME"
else
  step "compute-sanitizer memcheck" "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no \
    "${PYTEST[@]}" tests/test_ops.py -k "cuda and (test_flatten_padded or test_unflatten_average or test_unflatten_padded or big_and_many or mixed_dtypes) and not sgd-"
  step "compute-sanitizer racecheck" "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "${PYTEST[@]}" tests/test_ops.py -k "cuda and (test_divergence or test_unflatten_padded)"
fi
summary
