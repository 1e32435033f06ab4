#!/usr/bin/env bash
# Compile-only check of the CUDA sources, for machines without a GPU (CI).
#
# 1. Every csrc/cuda/*.cu (torch-free by design) is compiled with
#    `nvcc -std=c++17 -c -arch=sm_90` into a temporary directory.
# 2. The SASS of kernels.cu for that arch is checked (scripts/check_sass.py): 128-bit global
#    stores and loads in every vector loop, no generic accesses, no spills, registers leaving
#    at least 4 resident blocks per SM. cuobjdump/nvdisasm come from the toolkit when it has
#    them, else from the pinned nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels, installed
#    once with pip --target into the cache (PRSGD_CACHE, default ~/.cache/prsgd_hvd).
# 3. The CUDA glue csrc/cuda/*.cpp is syntax-checked with the host compiler against the
#    installed torch's headers. A CPU torch wheel lacks the generated
#    c10/cuda/impl/cuda_cmake_macros.h; a stub of it is supplied (it only defines export macros).
#    Skipped when no python with torch is found.
# Exits 0 with a message when nvcc is not installed. Usage: scripts/check_cuda_compile.sh [arch]
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH="${1:-sm_90}"
NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (PATH, /usr/local/cuda/bin); skipping CUDA compile check"
  exit 0
fi
# nvcc may be a wrapper or symlink outside the toolkit: find the headers next to the real one.
CUDA_HOME="${CUDA_HOME:-}"
if [[ -z "$CUDA_HOME" ]]; then
  for c in "$(dirname "$(readlink -f "$NVCC")")/.." /usr/local/cuda; do
    if [[ -f "$c/include/cuda_runtime_api.h" ]]; then CUDA_HOME="$(cd "$c" && pwd)"; break; fi
  done
fi
TMP="$(mktemp -d /tmp/prsgd_cuda_check.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"

shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
if (( ${#cu_files[@]} == 0 )); then echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2; exit 1; fi
for f in "${cu_files[@]}"; do
  out="$TMP/$(basename "${f%.cu}").o"
  echo "  nvcc -std=c++17 -c -arch=$ARCH $f"
  "$NVCC" -std=c++17 -O3 -c -arch="$ARCH" -Icsrc -Xptxas -warn-spills --Werror all-warnings \
    -o "$out" "$f"
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY="$(command -v python3 || true)"; fi
fi

# ---- SASS assertions -------------------------------------------------------------------------
CUDA_TOOLS_VERSION=13.2.78
CACHE="${PRSGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prsgd_hvd}"
tools_bin=""
if [[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/cuobjdump" && -x "$CUDA_HOME/bin/nvdisasm" ]]; then
  tools_bin="$CUDA_HOME/bin"
elif command -v cuobjdump >/dev/null && command -v nvdisasm >/dev/null; then
  tools_bin="$(dirname "$(command -v cuobjdump)")"
else
  target="$CACHE/cuda-tools-$CUDA_TOOLS_VERSION"
  if [[ ! -x "$target/nvidia/cu13/bin/nvdisasm" ]]; then
    echo "  installing nvidia-cuda-cuobjdump/nvdisasm==$CUDA_TOOLS_VERSION into $target"
    "${PY:-python3}" -m pip install -q --disable-pip-version-check --no-deps --target "$target.tmp" \
      "nvidia-cuda-cuobjdump==$CUDA_TOOLS_VERSION" "nvidia-cuda-nvdisasm==$CUDA_TOOLS_VERSION" \
      && rm -rf "$target" && mv "$target.tmp" "$target"
  fi
  tools_bin="$target/nvidia/cu13/bin"
fi
if [[ "$ARCH" == sm_* ]]; then
  echo "  nvcc -cubin -arch=$ARCH csrc/cuda/kernels.cu; SASS checks with $tools_bin/cuobjdump"
  "$NVCC" -std=c++17 -O3 -cubin -arch="$ARCH" -Icsrc -o "$TMP/kernels.cubin" csrc/cuda/kernels.cu
  PATH="$tools_bin:$PATH" "${PY:-python3}" scripts/check_sass.py "$TMP/kernels.cubin"
fi
glue=(csrc/cuda/*.cpp)
if [[ -n "$PY" ]] && TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"; then
  PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  mkdir -p "$TMP/stub/c10/cuda/impl"
  if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  for f in "${glue[@]}"; do
    echo "  c++ -fsyntax-only $f (torch headers from $TORCH_INC)"
    "${CXX:-c++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Wno-unknown-pragmas \
      -DPRSGD_WITH_CUDA -Icsrc -isystem "$TMP/stub" -isystem "$TORCH_INC" \
      -isystem "$TORCH_INC/torch/csrc/api/include" ${CUDA_HOME:+-isystem "$CUDA_HOME/include"} \
      -isystem "$PY_INC" "$f"
  done
else
  echo "  (no python with torch: CUDA glue syntax check skipped)"
fi
echo "check_cuda_compile: OK (${#cu_files[@]} .cu compiled for $ARCH, ${#glue[@]} glue file(s) checked)"
