# Sourced (from the repository root) by scripts/gpu-check.sh and scripts/gpu-bench.sh: the
# Debian 12 packages pion's C++ build needs on a GPU machine that lacks them, and the build-gpu
# configuration both scripts share.
#
#   pion_gpu_fetch_deps   download the packages into .gpu-deps/ (on a machine with network,
#                         before the GPU run; .gpu-deps/ is ignored through .git/info/exclude)
#   pion_gpu_use_deps     on the GPU machine: unpack .gpu-deps/*.deb under /tmp/pion-deps and
#                         point CMake, pkg-config, the compiler and the loader there (nothing
#                         to do when there is no .gpu-deps/: the libraries are installed)
#   pion_gpu_configure    configure build-gpu: Release, PION_CUDA=ON, no benchmarks, no MPI
#
# The device image has nvcc, CMake and a C++ compiler but not OpenBLAS, LAPACKE,
# nlohmann-json, CLI11 or GoogleTest, and no network.

pion_gpu_deps_dir=.gpu-deps
pion_gpu_build_dir=build-gpu
pion_gpu_prefix=/tmp/pion-deps
pion_gpu_packages=(libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libgfortran5
  liblapacke-dev liblapacke libtmglib3 libcli11-dev nlohmann-json3-dev libgtest-dev
  pkgconf-bin libpkgconf3)
pion_gpu_cmake_extra=()
# The loader path before pion_gpu_use_deps changes it (a Python with its own CUDA and BLAS
# libraries, such as PyTorch's, is best run without Debian's libraries in front).
pion_gpu_orig_ld_library_path="${LD_LIBRARY_PATH-}"
pion_gpu_using_deps=0

pion_gpu_fetch_deps() {
  mkdir -p "$pion_gpu_deps_dir"
  grep -qxF "/$pion_gpu_deps_dir/" .git/info/exclude 2>/dev/null ||
    echo "/$pion_gpu_deps_dir/" >>.git/info/exclude
  (cd "$pion_gpu_deps_dir" && apt-get download "${pion_gpu_packages[@]}")
  # The benchmark text for gpu-train.sh's baby runs (../shared is not carried to the device;
  # .gpu-deps/ is ignored by git, so this copy never enters the repository).
  if [[ -f ../shared/data/tinyshakespeare.txt ]]; then
    cp ../shared/data/tinyshakespeare.txt "$pion_gpu_deps_dir/"
  fi
  ls -l "$pion_gpu_deps_dir"
}

pion_gpu_use_deps() {
  compgen -G "$pion_gpu_deps_dir/*.deb" >/dev/null || return 0
  local prefix=$pion_gpu_prefix f
  mkdir -p "$prefix"
  for f in "$pion_gpu_deps_dir"/*.deb; do dpkg -x "$f" "$prefix"; done
  local lib="$prefix/usr/lib/x86_64-linux-gnu"
  export CMAKE_PREFIX_PATH="$prefix/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  # openblas.pc names absolute /usr paths: the sysroot prefix maps them into $prefix.
  export PKG_CONFIG_PATH="$lib/openblas-pthread/pkgconfig:$lib/pkgconfig:$prefix/usr/share/pkgconfig"
  export PKG_CONFIG_SYSROOT_DIR="$prefix"
  # liblapacke needs libblas.so.3 / liblapack.so.3 (OpenBLAS's, normally chosen by Debian's
  # alternatives) at link and run time.
  export LD_LIBRARY_PATH="$lib:$lib/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CPATH="$prefix/usr/include${CPATH:+:$CPATH}"
  command -v pkg-config >/dev/null ||
    pion_gpu_cmake_extra+=("-DPKG_CONFIG_EXECUTABLE=$prefix/usr/bin/pkgconf")
  pion_gpu_using_deps=1
  echo "== using the Debian packages in $pion_gpu_deps_dir (unpacked under $prefix)"
}

pion_gpu_configure() {
  cmake -S . -B "$pion_gpu_build_dir" -DCMAKE_BUILD_TYPE=Release -DPION_CUDA=ON \
    -DPION_BUILD_BENCH=OFF -DPION_MPI=OFF "${pion_gpu_cmake_extra[@]}"
}
