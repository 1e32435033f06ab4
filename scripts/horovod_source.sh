# What building Horovod 0.28.1 from its sdist needs with today's toolchains. Sourced by
# scripts/setup_env.sh (the venv build) and scripts/gpu_check.sh (the offline GPU build), so the
# two builds cannot drift apart.

# prepare_horovod_source SRC: the C++17 fix (upstream PR #3998, never released), checked.
prepare_horovod_source() {
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$1/CMakeLists.txt" "$1/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$1/horovod/torch/CMakeLists.txt" \
    || { echo "could not apply the C++17 patch to $1" >&2; return 1; }
}

# horovod_build_env: PyTorch and Gloo only, unless the caller exported other HOROVOD_* options.
horovod_build_env() {
  export HOROVOD_WITH_PYTORCH=${HOROVOD_WITH_PYTORCH:-1}
  export HOROVOD_WITHOUT_TENSORFLOW=${HOROVOD_WITHOUT_TENSORFLOW:-1}
  export HOROVOD_WITHOUT_MXNET=${HOROVOD_WITHOUT_MXNET:-1}
  export HOROVOD_WITH_GLOO=${HOROVOD_WITH_GLOO:-1}
  if [ -z "${HOROVOD_WITH_MPI:-}" ]; then export HOROVOD_WITHOUT_MPI=1; fi
  export HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-gloo}
  export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  # Gloo's CMakeLists asks for CMake 2.8.12; CMake 4 (what pip installs where no cmake is
  # found) refuses that without a policy floor.
  export CMAKE_POLICY_VERSION_MINIMUM=${CMAKE_POLICY_VERSION_MINIMUM:-3.5}
  # Horovod 0.28.1 relies on headers that g++ 13 no longer includes transitively ("'string'
  # is not a member of 'std'", seen with g++ 13.3 on Ubuntu 24.04).
  export CXXFLAGS="${CXXFLAGS:-} -include cstdint -include stdexcept -include string -include unordered_map -include vector -include functional -include memory"
}
