#!/usr/bin/env bash
# Installs the Debian 12 packages pion builds, tests and benchmarks with. Run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  build-essential cmake pkg-config git ccache clang libclang-rt-14-dev \
  libopenblas-dev libopenblas0-pthread liblapacke-dev zlib1g-dev \
  libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev \
  libsentencepiece-dev sentencepiece libopenmpi-dev openmpi-bin \
  python3 python3-numpy python3-torch python3-matplotlib \
  fortunes fortunes-min
