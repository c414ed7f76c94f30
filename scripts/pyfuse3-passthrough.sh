#!/usr/bin/env bash
# Installs pyfuse3 with FUSE passthrough into the environment of PYTHON (argument 1):
# pyfuse3's sdist from PyPI, patched with scripts/pyfuse3-passthrough.patch, built
# against the libfuse that pkg-config finds (it must be 3.17 or newer; set
# PKG_CONFIG_PATH, and LDFLAGS with an rpath, for a libfuse outside the system paths).
#
# The installed version carries the patch's digest and the libfuse version as a local
# label (3.5.0+passthrough.<digest>.fuse3.17.2), so a second run with the same inputs
# does nothing and a changed patch or libfuse rebuilds. Used by scripts/setup.sh and
# deploy/Dockerfile.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${1:?usage: $0 PYTHON}
PYFUSE3_VERSION=3.5.0
patch_file="$here/pyfuse3-passthrough.patch"

fuse_version=$(pkg-config --modversion fuse3 2>/dev/null) || {
    echo "pyfuse3-passthrough: pkg-config finds no fuse3 (libfuse3-dev, or PKG_CONFIG_PATH)" >&2; exit 1; }
if ! pkg-config --atleast-version=3.17 fuse3; then
    echo "pyfuse3-passthrough: libfuse $fuse_version is too old; passthrough needs 3.17 or newer" >&2
    exit 1
fi
digest=$(sha256sum "$patch_file" | cut -c1-8)
want="$PYFUSE3_VERSION+passthrough.$digest.fuse$fuse_version"
have=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)
if [[ "$have" == "$want" ]]; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download -q --no-deps --no-binary pyfuse3 "pyfuse3==$PYFUSE3_VERSION" -d "$work"
tar -xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" --no-same-owner -C "$work"
patch -s -p1 -d "$work/pyfuse3-$PYFUSE3_VERSION" < "$patch_file"
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3="$want" \
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$work/pyfuse3-$PYFUSE3_VERSION"
have=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')
[[ "$have" == "$want" ]] || { echo "pyfuse3-passthrough: $have installed, not $want" >&2; exit 1; }
echo "pyfuse3-passthrough: installed pyfuse3 $want"
