"""Build prsgd_hvd and its kernel extension ``prsgd_hvd._C``.

C++ sources in csrc/ (``*.cpp``) are always built; CUDA sources (``csrc/cuda/*.cu``) only when
the installed torch has CUDA (or FORCE_CUDA=1), so the same tree installs on CPU-only hosts.
Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already installed (an isolated build would fetch another torch).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
# The AVX2 kernel object goes last: where it and another object both emit an inline function
# from a header, the linker keeps the first copy, which is then the baseline-ISA one
# (NOTE: [CPU capability] in csrc/cpu_kernels.h).
cpp_sources = sorted(glob.glob("csrc/*.cpp"), key=lambda p: (p.endswith("_avx2.cpp"), p))
if cpp_sources and os.environ.get("PRSGD_NO_EXTENSION") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = (torch.version.cuda is not None and torch.cuda.is_available()) \
        or os.environ.get("FORCE_CUDA") == "1"
    # NOTE: [No FMA] in csrc/cpu_kernels_impl.h: contraction would change fp32 rounding.
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off"]
    if with_cuda:
        ext = CUDAExtension(
            "prsgd_hvd._C",
            # CUDA glue (csrc/cuda/*.cpp, torch CUDA headers) and the torch-free kernels
            # (csrc/cuda/*.cu) exist only in CUDA builds; the CPU build never sees them.
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.abspath("csrc")],
            define_macros=[("PRSGD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                # Target GPUs come from TORCH_CUDA_ARCH_LIST (e.g. "9.0" for
                                # H100/H200), as for every torch extension. No fast-math: the
                                # kernels must match the reference to fp32 rounding.
                                "nvcc": ["-O3", "-std=c++17"]
                                        + os.environ.get("PRSGD_NVCC_FLAGS", "").split()},
        )
    else:
        ext = CppExtension("prsgd_hvd._C", cpp_sources,
                           include_dirs=[os.path.abspath("csrc")],
                           extra_compile_args={"cxx": cxx_flags})
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="prsgd_hvd",
    version="0.1.0",
    description="Parallel Restarted SGD (local SGD with periodic model averaging) for Horovod",
    packages=find_packages(include=["prsgd_hvd", "prsgd_hvd.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "horovod>=0.28"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
