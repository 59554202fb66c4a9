#!/usr/bin/env bash
# scripts/gpu-check.sh without a GPU: the whole script runs in a temporary copy of scripts/
# with fake nvidia-smi, nvcc, cmake, ctest and apt-get first on PATH (ctest prints a canned
# `ctest -V` log). Checks: --fetch-deps in a git checkout without .git/info/ (and outside
# git); a GPU listed + a CUDA test skipped fails; the no-GPU error-path skip and a build
# without cuDNN's skip are allowed; no GPU listed fails; --out gets the whole logs, one per
# test; bad arguments exit 2.
# Usage: tests/scripts/test_gpu_check.sh SOURCE_DIR (ctest: ScriptGpuCheck).
source "$(dirname "$0")/lib.sh" "${1:-}"

repo=$tmp/repo
mkdir -p "$repo/scripts" "$tmp/bin"
cp "$src/scripts/gpu-check.sh" "$src/scripts/gpu-env.sh" "$repo/scripts/"

cat >"$tmp/bin/apt-get" <<'X'
#!/bin/sh
[ "$1" = download ] || exit 1
shift
for p in "$@"; do : >"${p}_1.0_amd64.deb"; done
X
cat >"$tmp/bin/nvidia-smi" <<'X'
#!/bin/sh
[ -n "${FAKE_GPU:-}" ] || { echo "No devices were found"; exit 6; }
case "$1" in
  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-fake)" ;;
  *) echo "NVIDIA H200, 143771 MiB, 580.82, 9.0" ;;
esac
X
printf '#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.88"\n' >"$tmp/bin/nvcc"
cat >"$tmp/bin/cmake" <<'X'
#!/bin/sh
mkdir -p build-gpu
echo "-- pion: CUDA back end ON (PION_CUDA=ON)"
echo "fake cmake $*"
X
cat >"$tmp/bin/ctest" <<'X'
#!/bin/sh
cat <<'LOG'
test 1
    Start 1: CudaOptim.PionMatchesCpu

1: Test command: /x/test_cuda_optim "--gtest_filter=CudaOptim.PionMatchesCpu"
1: [ RUN      ] CudaOptim.PionMatchesCpu
1: pion fp32 vs cpu: max rel 1e-6
1: [       OK ] CudaOptim.PionMatchesCpu (5 ms)
1/3 Test #1: CudaOptim.PionMatchesCpu ..........   Passed    0.10 sec
test 2
    Start 2: CudaTrain.NoGpuIsAClearError

2: [ RUN      ] CudaTrain.NoGpuIsAClearError
2: tests/test_cuda_train.cpp:60: Skipped
2: this machine has a GPU: the error path is not reachable
2: [  SKIPPED ] CudaTrain.NoGpuIsAClearError (0 ms)
2/3 Test #2: CudaTrain.NoGpuIsAClearError ......***Skipped   0.01 sec
test 3
    Start 3: CudaLayers.Param/1

3: [ RUN      ] CudaLayers.Param/1
LOG
if [ -n "${FAKE_CUDNN_SKIP:-}" ]; then
  echo "3: tests/test_cuda_cudnn_attention.cpp:40: Skipped"
  echo "3: built without cuDNN (CMake found no cudnn_graph.h and libcudnn; set PION_CUDNN_ROOT)"
  echo "3: [  SKIPPED ] CudaLayers.Param/1 (0 ms)"
  echo "3/3 Test #3: CudaLayers.Param/1 ......***Skipped   0.01 sec"
elif [ -n "${FAKE_SKIP:-}" ]; then
  echo "3: tests/test_cuda_layers.cpp:112: Skipped"
  echo "3: no CUDA device: cudaGetDeviceCount reports none"
  echo "3: [  SKIPPED ] CudaLayers.Param/1 (0 ms)"
  echo "3/3 Test #3: CudaLayers.Param/1 ......***Skipped   0.01 sec"
else
  echo "3: [       OK ] CudaLayers.Param/1 (1 ms)"
  echo "3/3 Test #3: CudaLayers.Param/1 ..........   Passed    0.01 sec"
fi
echo "100% tests passed, 0 tests failed out of 3"
X
chmod +x "$tmp/bin"/*
export PATH="$tmp/bin:$PATH"

# --fetch-deps in a git checkout that has no .git/info/ (git init makes one: remove it).
(cd "$repo" && git init -q . && rm -rf .git/info)
if (cd "$repo" && scripts/gpu-check.sh --fetch-deps) >"$tmp/fetch.log" 2>&1 &&
  [[ -f "$repo/.gpu-deps/libcli11-dev_1.0_amd64.deb" ]] &&
  grep -qxF /.gpu-deps/ "$repo/.git/info/exclude" &&
  [[ -z "$(cd "$repo" && git status --porcelain --untracked-files=all -- .gpu-deps)" ]]; then
  ok "--fetch-deps without .git/info/"
else
  fail "--fetch-deps without .git/info/"; cat "$tmp/fetch.log"
fi
# ... and outside any git checkout.
plain=$tmp/plain
mkdir -p "$plain/scripts" && cp "$repo/scripts/"*.sh "$plain/scripts/"
if (cd "$plain" && GIT_CEILING_DIRECTORIES=$tmp scripts/gpu-check.sh --fetch-deps) \
  >"$tmp/fetch2.log" 2>&1 && [[ -f "$plain/.gpu-deps/libgtest-dev_1.0_amd64.deb" ]]; then
  ok "--fetch-deps outside git"
else
  fail "--fetch-deps outside git"; cat "$tmp/fetch2.log"
fi
rm -rf "$repo/.gpu-deps"  # the fake .deb files are empty: pion_gpu_use_deps must not unpack them

run_check() {  # run_check NAME EXPECTED_STATUS ENV... : gpu-check.sh --out $tmp/NAME
  local name=$1 want=$2
  shift 2
  (cd "$repo" && env "$@" scripts/gpu-check.sh --out "$tmp/$name") >"$tmp/$name.console" 2>&1
  local got=$?
  if [[ $got == "$want" ]]; then ok "$name: exit $got"; else
    fail "$name: exit $got, expected $want"; cat "$tmp/$name.console"
  fi
}

run_check gpu-pass 0 FAKE_GPU=1
[[ -f $tmp/gpu-pass/tests/CudaOptim.PionMatchesCpu.log && -f $tmp/gpu-pass/tests/CudaLayers.Param_1.log ]] &&
  grep -q "pion fp32 vs cpu" "$tmp/gpu-pass/tests/CudaOptim.PionMatchesCpu.log" &&
  grep -q "fake cmake --build" "$tmp/gpu-pass/build.log" &&
  grep -q "NVIDIA H200" "$tmp/gpu-pass/gpu.txt" &&
  grep -q "gpu-check: passed" "$tmp/gpu-pass/summary.txt" &&
  ok "--out holds gpu.txt, build.log, one log per test, summary.txt" ||
  { fail "--out contents"; ls -R "$tmp/gpu-pass"; }

run_check gpu-skip 1 FAKE_GPU=1 FAKE_SKIP=1
grep -q "lists a GPU but these CUDA tests skipped" "$tmp/gpu-skip.console" &&
  grep -q "^  CudaLayers.Param_1$" "$tmp/gpu-skip.console" &&
  ! grep -q "^  CudaTrain.NoGpuIsAClearError" "$tmp/gpu-skip.console" &&
  ok "a skipped CUDA test on a GPU machine is named" || fail "skip message"

# A build without cuDNN skips the --attention cudnn tests: allowed (the rest runs without it).
run_check gpu-no-cudnn 0 FAKE_GPU=1 FAKE_CUDNN_SKIP=1

run_check no-gpu 1
grep -q "lists no GPU" "$tmp/no-gpu.console" && ok "no GPU: says so" || fail "no-GPU message"

(cd "$repo" && scripts/gpu-check.sh --bogus) >/dev/null 2>&1
[[ $? == 2 ]] && ok "unknown option: exit 2" || fail "unknown option"
(cd "$repo" && scripts/gpu-check.sh --out) >/dev/null 2>&1
[[ $? == 2 ]] && ok "--out without a folder: exit 2" || fail "--out without a folder"

finish test_gpu_check
