#!/usr/bin/env bash
# Configure and build the extension with CMake (CMakeLists.txt) into build/cmake, against the
# torch of .venv/bin/python (or $PYTHON), then load the library with torch.ops.load_library and
# check each op against the pure-torch reference. Usage: scripts/check_cmake_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then PY="$(command -v python3)"; fi
PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
WITH_CUDA="$("$PY" -c 'import torch; print("ON" if torch.version.cuda and torch.cuda.is_available() else "OFF")')"
GEN=(); if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
echo "check_cmake_build: torch from $PREFIX, PRSGD_WITH_CUDA=$WITH_CUDA"
cmake -S . -B build/cmake "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" \
  -DPython3_EXECUTABLE="$(command -v "$PY" || echo "$PY")" -DPRSGD_WITH_CUDA="$WITH_CUDA"
cmake --build build/cmake -j "${JOBS:-2}"

LIB="$(ls build/cmake/_C*.so | head -n 1)"
echo "check_cmake_build: built $LIB"
# Load the CMake-built library only (importing the prsgd_hvd package would also load an
# in-place setup.py build, and a namespace can be defined by one library only).
"$PY" - "$LIB" <<'PYEOF'
import importlib.util, sys
import torch

torch.ops.load_library(sys.argv[1])
spec = importlib.util.spec_from_file_location("ops_reference", "prsgd_hvd/ops_reference.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for dev in devices:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (), (0,), (70000,), (17,)]
    params = [torch.randn(s, generator=g).to(dev) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dev) for s in shapes]
    grads[1] = None
    bufs = [torch.randn(s, generator=g).to(dev) for s in shapes]
    flat = torch.ops.prsgd_hvd.flatten(params)
    assert torch.equal(flat, ref.flatten(params)), "flatten"
    into = torch.full_like(flat, float("nan"))
    torch.ops.prsgd_hvd.flatten_into(params, into)
    assert torch.equal(into, flat), "flatten_into"
    ours = [torch.full_like(p, float("nan")) for p in params]
    theirs = [torch.empty_like(p) for p in params]
    torch.ops.prsgd_hvd.unflatten_average_(flat, ours, 0.5)
    ref.unflatten_average_(flat, theirs, scale=0.5)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), "unflatten_average_"
    bufs2 = [b.clone() for b in bufs]
    args = dict(scale=0.5, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4,
                nesterov=True, maximize=False)
    torch.ops.prsgd_hvd.unflatten_average_sgd_(flat, ours, grads, bufs, [False] * len(shapes),
                                               *args.values())
    ref.unflatten_average_sgd_(flat, theirs, grads, bufs2, first_step=False, **args)
    for a, b in zip(ours + bufs, theirs + bufs2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # divergence (the optional last argument): sum of (old param - average)^2, added
    d_ours = torch.ones(1, dtype=torch.float64, device=dev)
    d_ref = d_ours.clone()
    torch.ops.prsgd_hvd.unflatten_average_sgd_(flat, ours, grads, bufs, [False] * len(shapes),
                                               *args.values(), d_ours)
    ref.unflatten_average_sgd_(flat, theirs, grads, bufs2, first_step=False, divergence=d_ref,
                               **args)
    torch.ops.prsgd_hvd.unflatten_average_(flat, ours, 0.5, d_ours)
    ref.unflatten_average_(flat, theirs, scale=0.5, divergence=d_ref)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-12, atol=0.0)
    print(f"check_cmake_build: {dev}: flatten, flatten_into, unflatten_average_, "
          "unflatten_average_sgd_ (with and without divergence) match the reference")
PYEOF
echo "check_cmake_build: OK"
