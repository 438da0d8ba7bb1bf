#!/usr/bin/env bash
# Build the deforest image and train a tiny model inside it, without a Docker engine or registry:
# debootstrap makes a Debian bookworm + python3 base, buildah builds the Dockerfile on it and
# runs the training (chroot isolation; `podman run` needs kernel features this may not have).
# Needs root (or a user namespace), buildah, debootstrap and PyPI access for what the host pip's
# local sources lack (below). Slow (the torch wheels are several GB), so not part of .ci/run:
#   sudo scripts/container-smoke.sh
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), IMAGE (localhost/deforest:smoke),
# BASE_IMAGE (localhost/deforest-base:bookworm; reused when present), CA_BUNDLE (for pip in the
# build; default: the host's PIP_CERT or /etc/ssl/certs/ca-certificates.crt), KEEP=1 keeps the image.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=${IMAGE:-localhost/deforest:smoke}
BASE_IMAGE=${BASE_IMAGE:-localhost/deforest-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "container-smoke: needs $tool (apt-get install buildah debootstrap)" >&2; exit 2; }
done
[ -r "$CA_BUNDLE" ] || { echo "container-smoke: CA bundle $CA_BUNDLE not readable (set CA_BUNDLE)" >&2; exit 2; }
# The host pip's local package sources (file:// indexes and find-links folders, e.g. a wheel mirror
# named in /etc/xdg/pip/pip.conf) go into the build too, mounted read-only at the same paths: pip
# there then takes torch and its CUDA wheels (GBs) from disk where the host has them, as the host
# does. An index folder is mounted with its parent, where a mirror keeps the files its pages link to.
# Prints one build argument or mount per line; nothing when pip has no local source.
local_pip_sources() {
    python3 - <<'PY'
import os, subprocess, sys
from urllib.parse import urlparse
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}  # pip lists the environment's values first, and they win over the files'
for line in listing.splitlines():
    key, _, value = line.partition("=")
    conf.setdefault(key.split(".", 1)[-1], value.strip("'\""))
def local(entry):
    url = urlparse(entry)
    path = url.path if url.scheme == "file" else entry if not url.scheme else ""
    return os.path.realpath(path) if path and os.path.isdir(path) else ""
indexes = [p for p in map(local, (conf.get("index-url", "") + " " + conf.get("extra-index-url", "")).split()) if p]
links = [p for p in map(local, conf.get("find-links", "").split()) if p]
if indexes:
    print("--build-arg=PIP_EXTRA_INDEX_URL=" + " ".join("file://" + p for p in indexes))
if links:
    print("--build-arg=PIP_FIND_LINKS=" + " ".join(links))
for folder in sorted({os.path.dirname(p) for p in indexes} | set(links)):
    print(f"--volume={folder}:{folder}:ro")
PY
}
mapfile -t pip_local < <(local_pip_sources)
work=$(mktemp -d)
ctr=""
cleanup() {
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "== base image $BASE_IMAGE: debootstrap bookworm from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
        bookworm "$work/rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
    rm -rf "$work/rootfs"
    base=$(buildah from scratch)
    buildah add "$base" "$work/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$base"
    buildah commit --rm "$base" "$BASE_IMAGE" >/dev/null
    rm -f "$work/rootfs.tar"
fi

echo "== build $IMAGE (FROM $BASE_IMAGE)"
buildah bud --isolation chroot --layers \
    --build-arg BASE="$BASE_IMAGE" \
    --volume "$CA_BUNDLE:/etc/ssl/certs/build-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/certs/build-ca.crt \
    "${pip_local[@]}" \
    -t "$IMAGE" -f Dockerfile .

entrypoint=$(buildah inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE")
user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
[ "$entrypoint" = '[deforest-train]' ] || { echo "container-smoke: entrypoint is $entrypoint" >&2; exit 1; }
case "$user" in ""|root|0|0:*) echo "container-smoke: image runs as root" >&2; exit 1 ;; esac

echo "== tiny training in the image (user $user, the shipped sample mounted at /data)"
ctr=$(buildah from "$IMAGE")
buildah run --isolation chroot -v "$REPO/data/eurosat-ms:/data:ro" "$ctr" -- \
    deforest-train data.root=/data trainer.fast_dev_run=true model.width=8 model.tta=false \
    trainer.enable_progress_bar=false
uid=$(buildah run --isolation chroot "$ctr" -- id -u)
[ "$uid" != 0 ] || { echo "container-smoke: training ran as root" >&2; exit 1; }
buildah run --isolation chroot "$ctr" -- sh -c 'python -c "import json,glob,sys; m=json.load(open(glob.glob(\"/logs/train/runs/*/metrics.json\")[0])); print(\"test/accuracy\", m[\"test/accuracy\"])"'
# the working container still holds the image: remove it first, or `buildah rmi` refuses (exit 1)
buildah rm "$ctr" >/dev/null
ctr=""
[ "${KEEP:-0}" = 1 ] || buildah rmi "$IMAGE" >/dev/null
echo "container-smoke: OK"
