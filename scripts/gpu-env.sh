# Sourced (from the repository root) by scripts/gpu-check.sh and scripts/gpu-bench.sh: the
# Debian 12 packages pion's C++ build needs on a GPU machine that lacks them, and the build-gpu
# configuration both scripts share.
#
#   pion_gpu_fetch_deps   download the packages into .gpu-deps/ (on a machine with network,
#                         before the GPU run; .gpu-deps/ is ignored by git: .gitignore, or
#                         pion_gpu_ignore_deps_dir adds it to the git directory's info/exclude)
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
  pion_gpu_ignore_deps_dir
  (cd "$pion_gpu_deps_dir" && apt-get download "${pion_gpu_packages[@]}")
  # The benchmark text for gpu-train.sh's baby runs (../shared is not carried to the device;
  # .gpu-deps/ is ignored by git, so this copy never enters the repository).
  if [[ -f ../shared/data/tinyshakespeare.txt ]]; then
    cp ../shared/data/tinyshakespeare.txt "$pion_gpu_deps_dir/"
  fi
  ls -l "$pion_gpu_deps_dir"
}

# Keeps .gpu-deps/ out of git (the device tool carries it only when asked: carry=[".gpu-deps"]).
# The repository's .gitignore lists it; in a copy whose .gitignore does not, the pattern goes
# into the git directory's info/exclude, found through git (in a worktree .git is a file, and
# info/ may not exist yet). Outside a git checkout there is nothing to do.
pion_gpu_ignore_deps_dir() {
  git check-ignore -q "$pion_gpu_deps_dir/" 2>/dev/null && return 0
  local exclude
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) || return 0
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/$pion_gpu_deps_dir/" "$exclude" 2>/dev/null || echo "/$pion_gpu_deps_dir/" >>"$exclude"
}

# 0 when `nvidia-smi -L` lists at least one GPU ("GPU 0: NVIDIA H200 (UUID: ...)").
pion_gpu_listed() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'
}

# Splits the output of `ctest -V` (LOG: every line a test printed starts with "N: ") into one
# file per test, DIR/<test name>.log ('/' in names becomes '_'), so each can be read whole.
pion_gpu_split_ctest_log() {
  local log=$1 dir=$2
  mkdir -p "$dir"
  awk -v dir="$dir" '
    /^ *Start +[0-9]+: / { n = $2; sub(/:$/, "", n); name = $3; gsub(/\//, "_", name)
                           names[n] = name; next }
    match($0, /^[0-9]+: /) { n = substr($0, 1, RLENGTH - 2)
                             f = dir "/" ((n in names) ? names[n] : ("test-" n)) ".log"
                             print substr($0, RLENGTH + 1) >> f }' "$log"
}

# Prints the name of every per-test log in DIR (from pion_gpu_split_ctest_log) whose test was
# skipped for a reason other than "this machine has a GPU" (the tests of the no-GPU error
# paths, unreachable on a GPU machine) or "built without cuDNN" (--attention cudnn where CMake
# found no cuDNN: the rest of the back end runs without it). On a machine with a GPU any other
# skip means a CUDA test did not run (no device found, numpy missing, ...), so gpu-check.sh
# fails.
pion_gpu_unexpected_skips() {
  local dir=$1 f
  for f in "$dir"/*.log; do
    [[ -e "$f" ]] || continue
    if grep -q '^\[  SKIPPED \]' "$f" &&
      ! grep -q -e 'this machine has a GPU' -e 'built without cuDNN' "$f"; then
      basename "$f" .log
    fi
  done
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

# cuDNN's folder (include/, lib/) when the CUDA toolkit has none: the nvidia-cudnn wheel of
# the image's python3 (PyTorch's). Prints nothing when there is neither.
pion_gpu_cudnn_root() {
  local nvcc_dir
  nvcc_dir=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")
  [[ -f "$nvcc_dir/../include/cudnn_graph.h" ]] && return 0
  python3 -c 'import nvidia.cudnn as c; print(list(c.__path__)[0])' 2>/dev/null || true
}

pion_gpu_configure() {
  local cudnn
  cudnn=$(pion_gpu_cudnn_root)
  if [[ -n "$cudnn" ]]; then
    pion_gpu_cmake_extra+=("-DPION_CUDNN_ROOT=$cudnn")
    export LD_LIBRARY_PATH="$cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  cmake -S . -B "$pion_gpu_build_dir" -DCMAKE_BUILD_TYPE=Release -DPION_CUDA=ON \
    -DPION_BUILD_BENCH=OFF -DPION_MPI=OFF "${pion_gpu_cmake_extra[@]}"
}
