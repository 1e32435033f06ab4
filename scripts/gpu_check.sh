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
#                                    skipped, one that runs past its cap or the budget is
#                                    killed), the most valuable first:
#     1. the extension for the local GPU (TORCH_CUDA_ARCH_LIST = its compute capability),
#        built in place with setup.py;
#     2. benchmarks/bench_gpu_round.py --part kernels: CUDA events and graph replay of pack,
#        average, average+step (+divergence) and the round, padded and packed, ResNet-50 and
#        1 GiB models, the launch-configuration sweep, the copy_ ceiling of the same run;
#     3. ncu --clock-control none on a few launches of the pack and avg+step kernels
#        (bench_gpu_round.py --part profile), torch.profiler if ncu is missing or fails;
#     4. Horovod 0.28.1 from the carried sdist with the C++17 patch of scripts/setup_env.sh
#        (Gloo; NCCL where two GPUs and NCCL are found), --user unless a venv is active
#        (skipped when `import horovod.torch` already works);
#     5. bench_gpu_round.py --part e2e: a 1-rank ResNet-50-sized step, DistributedLocalSGD(I=1)
#        against torch.optim.SGD(fused=True) and (foreach=True);
#    5b. scripts/check_outer_device.py: a 1-rank outer job (DiLoCo's fused outer kernel, and
#        Adam's step() per staged chunk) with outer_device="cpu" against the same job without
#        it: the same bits, theta0 and the outer state in page-locked host memory, device
#        memory peak and between rounds both ways;
#     6. the CUDA variants of tests/test_ops.py (launch configurations, stream race, graphs);
#     7. compute-sanitizer memcheck and racecheck on a subset of the op tests;
#     8. the trajectory scenarios of tests/test_trajectories.py with the model on the GPU,
#        2 ranks under horovodrun, against the float64 reference;
#     9. horovodrun -np 2 of examples/quickstart.py, if time is left;
#   and prints one short summary last (steps, then the figures), full logs and figures under
#   the output directory; exit 1 if any step failed.
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
# skipped when less than 30 s of the budget is left, limited to what is left and to $CAP seconds
# when CAP is set (CAP=90 step ...).
step() {
  local name=$1; shift
  local t=$SECONDS left=$((BUDGET - (SECONDS - T0) - 10)) word
  for word in ${GPU_CHECK_SKIP:-}; do  # a focused rerun: GPU_CHECK_SKIP="horovod ncu ..."
    if [[ "${name,,}" == *"${word,,}"* ]]; then skip "$name" "GPU_CHECK_SKIP has '$word'"; return; fi
  done
  if (( left < 30 )); then skip "$name" "out of time (budget $BUDGET s)"; return; fi
  if [[ -n "${CAP:-}" ]] && (( CAP < left )); then left=$CAP; fi
  echo "== $name: $*" | tee -a "$LOG"
  if run_limited "$left" "$@" >>"$LOG" 2>&1; then
    SUMMARY+=("PASS  $name ($((SECONDS - t)) s)")
  else
    local rc=$?
    SUMMARY+=("FAIL  $name (exit $rc, $((SECONDS - t)) s; see $LOG)")
    FAILED=1
    tail -n 25 "$LOG"
  fi
}
skip() { SUMMARY+=("SKIP  $1: $2"); echo "== $1: skipped: $2" | tee -a "$LOG"; }

summary() {
  echo
  echo "================ gpu_check summary ($((SECONDS - T0)) s, mode $MODE) ================"
  echo "machine: ${GPU_NAME:-no GPU}; torch ${TORCH_VERSION:-?}; CUDA ${TORCH_CUDA:-?}; ${GPU_STATE:-}"
  printf '%s\n' "${SUMMARY[@]}"
  local f
  for f in bench_gpu_round.txt ncu_summary.txt e2e.txt outer_device.txt; do
    [[ -f "$OUT_DIR/$f" ]] && { echo "-- $f:"; sed -n '/^SUMMARY/,$p' "$OUT_DIR/$f" | cut -c1-160 | head -n 70; }
  done
  echo "logs and figures: $OUT_DIR ($(ls "$OUT_DIR" | tr '\n' ' '))"
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


GPU_STATE=""
if [[ "$MODE" == run ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi >>"$LOG" 2>&1
  GPU_STATE=$(nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader 2>/dev/null | head -n1 | sed 's/^/SM, max SM, mem clock, temp, power: /')
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PRSGD_REQUIRE_EXTENSION=1 PYTHONUNBUFFERED=1
BENCH=("$PY" benchmarks/bench_gpu_round.py)

# ---- 1. the extension for this GPU ----------------------------------------------------------
build_ext() {
  rm -f prsgd_hvd/_C*.so
  # (Horovod is built later: bench_gpu_round.py loads the kernels without it.)
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$GPU_CC" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace &&
    "$PY" benchmarks/bench_gpu_round.py --part check
}
if [[ "$MODE" == dry ]]; then
  skip "build the extension for the local GPU" "no GPU (dry run)"
else
  CAP=240 step "build the extension (TORCH_CUDA_ARCH_LIST=$GPU_CC)" build_ext
fi

# ---- 2. the kernels timed: events, graphs, launch configurations -----------------------------
if [[ "$MODE" == dry ]]; then  # the same code paths on the CPU, tiny sizes
  step "bench_gpu_round --part kernels (CPU code path, --small)" "${BENCH[@]}" --device cpu --small \
    --exercise-configs --part kernels --calls 1 --rounds 2 --models resnet50,flat1g_300
else
  CAP=200 step "bench_gpu_round --part kernels" bash -o pipefail -c \
    "'$PY' benchmarks/bench_gpu_round.py --part kernels --json '$OUT_DIR/bench_gpu_round.json' 2>&1 | tee '$OUT_DIR/bench_gpu_round.txt'"
fi

# ---- 3. where the time goes: ncu on a few launches, torch.profiler otherwise -----------------
NCU=""
for c in "$(command -v ncu || true)" "$CUDA_HOME/bin/ncu" /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu; do
  [[ -n "$c" && -x "$c" ]] && { NCU="$c"; break; }
done
profile_ncu() {
  local rep="${TMPDIR:-/tmp}/prsgd_ncu_$$"
  "$NCU" --clock-control none --target-processes all --kernel-name regex:multi_segment_kernel \
    --launch-count 5 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum -f -o "$rep" \
    "$PY" benchmarks/bench_gpu_round.py --part profile --models resnet50 || return 1
  "$NCU" --import "$rep.ncu-rep" --page details > "$OUT_DIR/ncu_details.txt" || return 1
  rm -f "$rep.ncu-rep"
  "$PY" benchmarks/bench_gpu_round.py --part ncu-summary --input "$OUT_DIR/ncu_details.txt" \
    > "$OUT_DIR/ncu_summary.txt" && cat "$OUT_DIR/ncu_summary.txt" &&
    grep -q "msk<" "$OUT_DIR/ncu_summary.txt"
}
profile_torch() {
  "$PY" benchmarks/bench_gpu_round.py --part profile --torch-profiler --models resnet50 --rounds 5 \
    > "$OUT_DIR/torch_profile.txt" 2>&1 && { echo "SUMMARY torch.profiler (ncu failed or missing)";
    grep -E "Name|multi_segment|add_block|Self CPU time total|Self CUDA time total" "$OUT_DIR/torch_profile.txt" | cut -c1-200; } \
    > "$OUT_DIR/ncu_summary.txt"
}
if [[ "$MODE" == dry ]]; then
  step "ncu summary parser (sample report)" bash -c "printf '%s\n' \
'  void multi_segment_kernel<FlattenFunctor<float, float>, 4>(const Segment *) (3580, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0' \
'    DRAM Throughput                   %        89.43' '    Duration                         us        55.23' \
'    dram__bytes_read.sum            Mbyte       102.23' > '$OUT_DIR/ncu_sample.txt' && \
'$PY' benchmarks/bench_gpu_round.py --part ncu-summary --input '$OUT_DIR/ncu_sample.txt' | grep -q '55.2' && rm '$OUT_DIR/ncu_sample.txt'"
  step "profile part (CPU code path)" "${BENCH[@]}" --device cpu --small --exercise-configs --part profile --models resnet50
  skip "ncu" "no GPU (dry run); found: ${NCU:-none}"
elif [[ -n "$NCU" ]]; then
  CAP=150 step "ncu --clock-control none (5 launches, ResNet-50)" profile_ncu
  if [[ "${SUMMARY[-1]}" == FAIL* ]]; then
    CAP=90 step "torch.profiler (fallback for ncu)" profile_torch
  fi
else
  CAP=90 step "torch.profiler (ncu not found)" profile_torch
fi

# ---- 4. Horovod (for the e2e step and the trajectories) ------------------------------------
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
  CAP=200 step "horovod $HOROVOD_VERSION from the carried sdist" build_horovod
fi

# ---- 5. the 1-rank training step end to end --------------------------------------------------
if [[ "$MODE" == dry ]]; then
  if have_horovod; then
    step "e2e part (CPU code path)" "${BENCH[@]}" --device cpu --small --part e2e --calls 2 --rounds 2
  else
    skip "e2e part (CPU code path)" "horovod.torch does not import here"
  fi
elif have_horovod; then
  CAP=120 step "bench_gpu_round --part e2e (1 rank)" bash -o pipefail -c \
    "'$PY' benchmarks/bench_gpu_round.py --part e2e 2>&1 | tee '$OUT_DIR/e2e.txt'"
else
  skip "bench_gpu_round --part e2e" "horovod.torch does not import"
fi

# ---- 5b. theta0 and the outer state in host memory (outer_device="cpu") ------------------------
if [[ "$MODE" == dry ]]; then
  if have_horovod; then
    step "outer_device='cpu' vs None (CPU code path)" "$PY" scripts/check_outer_device.py --device cpu --small
  else
    skip "outer_device='cpu' vs None (CPU code path)" "horovod.torch does not import here"
  fi
elif have_horovod; then
  CAP=120 step "outer_device='cpu' vs None on CUDA: bits and device memory" bash -o pipefail -c \
    "'$PY' scripts/check_outer_device.py 2>&1 | tee '$OUT_DIR/outer_device.txt'"
else
  skip "outer_device='cpu' vs None on CUDA" "horovod.torch does not import"
fi

# ---- 6. CUDA op tests -------------------------------------------------------------------------
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
else
  CAP=180 step "CUDA op tests, launch configurations, stream race, graph capture" \
    "${PYTEST[@]}" tests/test_ops.py tests/test_ops_outer.py -k "$CUDA_TESTS" -ra
fi

# ---- 7. compute-sanitizer (it slows kernels 10-100x: a subset) ---------------------------------
SAN_MEMCHECK="cuda and (test_flatten_padded or test_unflatten_padded or big_and_many or mixed_dtypes or launch_configs or (test_divergence_and_packed_layout and float32-float16))"
# racecheck is 10x slower than memcheck: the kernels with shared memory (divergence sums) in the
# default launch configuration; memcheck covers every configuration.
# (test_ops_outer.py's test_divergence_and_packed_layout: the outer round's block sums, one pair.)
SAN_RACECHECK="cuda and ((test_divergence and not packed_layout) or test_unflatten_padded or (test_divergence_and_packed_layout and float32-float16))"
if [[ "$MODE" == dry ]]; then
  step "sanitizer test selections are not empty (collect only)" bash -c \
    "'$PY' -m pytest -q -p no:cacheprovider --collect-only tests/test_ops.py -k '$SAN_MEMCHECK' | grep -q '::' && \
     '$PY' -m pytest -q -p no:cacheprovider --collect-only tests/test_ops.py -k '$SAN_RACECHECK' | grep -q '::'"
  skip "compute-sanitizer" "no GPU (dry run); found: ${SANITIZER:-none}"
elif [[ -z "$SANITIZER" ]]; then
  skip "compute-sanitizer" "not found under $CUDA_HOME"
else
  CAP=120 step "compute-sanitizer memcheck" "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no \
    "${PYTEST[@]}" tests/test_ops.py tests/test_ops_outer.py -k "$SAN_MEMCHECK"
  CAP=150 step "compute-sanitizer racecheck" "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "${PYTEST[@]}" tests/test_ops.py tests/test_ops_outer.py -k "$SAN_RACECHECK"
fi

# ---- 8. the trajectories with the model on the GPU -------------------------------------------
if [[ "$MODE" == dry ]]; then
  skip "CUDA trajectories under horovodrun" "no GPU (dry run)"
elif have_horovod; then
  CAP=150 step "CUDA trajectories, 2 ranks under horovodrun" env PATH="$(dirname "$PY"):$HOME/.local/bin:$PATH" \
    "${PYTEST[@]}" tests/test_trajectories.py -k cuda -ra
else
  skip "CUDA trajectories under horovodrun" "horovod.torch does not import"
fi

# ---- 9. a two-process Horovod job, if time is left ---------------------------------------------
# The quickstart trains on the CPU (it has no device option): it checks Horovod as built here and
# the package end to end, not the CUDA kernels.
run_quickstart() {
  "$PY" -c "import horovod.torch as h; print('horovod NCCL built:', h.nccl_built())"
  PATH="$(dirname "$PY"):$HOME/.local/bin:$PATH" horovodrun -np 2 -H localhost:2 --gloo \
    "$PY" examples/quickstart.py --steps 60 --intervals 4 16
}
if [[ "$MODE" == dry ]]; then
  skip "horovodrun -np 2 quickstart" "no GPU (dry run)"
elif (( BUDGET - (SECONDS - T0) < 90 )); then
  skip "horovodrun -np 2 quickstart" "less than 90 s of the budget left"
else
  CAP=80 step "horovodrun -np 2 examples/quickstart.py" run_quickstart
fi
summary
