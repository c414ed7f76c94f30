#!/usr/bin/env bash
# Builds the mmfs image (deploy/Dockerfile) for real, without a Docker daemon: buildah,
# chroot isolation, vfs storage. Base images cannot be pulled here, so the Dockerfile's
# base, debian:trixie-slim (Debian 13), is made locally with debootstrap and tagged with
# the official name; the build itself then runs apt-get and pip against the registries.
#
#   scripts/build-image.sh            build (as root), tag $TAG, print the time taken
#   scripts/build-image.sh --check    also: in the built image, `mmfs mount` mounts and
#                                     serves a read (scripts/image-check.py, chrooted in)
#   scripts/build-image.sh --check-only   the check alone, on the image built before
#
# Work and image storage live in $MMFS_IMAGE_WORK (default /var/tmp/mmfs-image; it must
# not be on overlayfs: the check's FUSE passthrough cache lives there). The base is made
# once and kept (delete the folder to remake it). Slow (minutes): not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
check= build=1
case ${1:-} in
    --check) check=1 ;;
    --check-only) check=1 build= ;;
    "") ;;
    *) echo "usage: $0 [--check | --check-only]" >&2; exit 2 ;;
esac
[[ $(id -u) == 0 ]] || { echo "build-image: run as root" >&2; exit 1; }
WORK=${MMFS_IMAGE_WORK:-/var/tmp/mmfs-image}
TAG=${TAG:-ghcr.io/ai-dynamo/mmfs:$(sed -n 's/^ *newTag: *//p' deploy/base/kustomization.yaml | tr -d '"' | head -1)}
BASE=docker.io/library/debian:trixie-slim
mkdir -p "$WORK"
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null
done
bah=(buildah --storage-driver vfs --root "$WORK/storage" --runroot "$WORK/run")

# The base: Debian 13 minbase from debootstrap, standing in for debian:trixie-slim.
if ! "${bah[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
    start=$SECONDS
    if [[ ! -f $WORK/rootfs/.complete ]]; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase trixie "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
        rm -rf "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/var/cache/apt/archives/"*.deb
        touch "$WORK/rootfs/.complete"
    fi
    mkdir -p "$WORK/base"
    tar -C "$WORK/rootfs" --exclude=./.complete -cf "$WORK/base/root.tar" .
    printf 'FROM scratch\nADD root.tar /\nCMD ["bash"]\n' > "$WORK/base/Containerfile"
    "${bah[@]}" bud --isolation chroot --pull-never -q -t "$BASE" -f "$WORK/base/Containerfile" "$WORK/base" >/dev/null
    rm -f "$WORK/base/root.tar"
    echo "build-image: base $BASE made with debootstrap in $((SECONDS - start)) s"
fi

# The image. pip inside needs this machine's CA bundle (a pip.conf bound in; --env does
# not reach RUN steps); apt gets this machine's apt.conf.d settings when it has them.
binds=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.pem:ro)
printf '[global]\ncert = /run/host-ca.pem\n' > "$WORK/pip.conf"
binds+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
[[ -f /etc/apt/apt.conf.d/99artifact-registry ]] \
    && binds+=(-v /etc/apt/apt.conf.d/99artifact-registry:/etc/apt/apt.conf.d/99host:ro)
if [[ -n $build ]]; then
    start=$SECONDS
    "${bah[@]}" bud --isolation chroot --pull-never "${binds[@]}" -t "$TAG" -f deploy/Dockerfile . >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; echo "build-image: build failed (log: $WORK/build.log)" >&2; exit 1; }
    size=$("${bah[@]}" images --format '{{.Size}}' "$TAG" 2>/dev/null | head -1)
    echo "build-image: $TAG built in $((SECONDS - start)) s, ${size:-?} (log: $WORK/build.log)"
fi
[[ -n $check ]] || exit 0

# The check: the image's root, chrooted into in a private mount namespace with /dev,
# /proc, /sys and a cache folder on $WORK (not overlayfs) bound in.
ctr=$("${bah[@]}" from --pull-never "$TAG")
trap '"${bah[@]}" umount "$ctr" >/dev/null 2>&1; "${bah[@]}" rm "$ctr" >/dev/null 2>&1' EXIT
root=$("${bah[@]}" mount "$ctr")
rm -rf "$WORK/check-cache" && mkdir -p "$WORK/check-cache"
cp scripts/image-check.py "$root/image-check.py"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
start=$SECONDS
unshare --mount --propagation private -- bash -euc '
    root=$1 cache=$2
    mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/cache" "$root/tmp"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/tmp"
    mount --bind "$cache" "$root/cache"
    exec chroot "$root" /usr/bin/env -i PATH=/opt/mmfs/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        python /image-check.py /cache
' _ "$root" "$WORK/check-cache"
echo "build-image: check passed in $((SECONDS - start)) s"
