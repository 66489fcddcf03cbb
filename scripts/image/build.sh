#!/usr/bin/env bash
# Build the tether image (one `tether` entrypoint for the proxy, proxy-init and every controller) with
# Debian's buildah, from Debian's own packages: no Docker Hub. The base (bookworm minbase with python3,
# iptables and setcap) is made once with debootstrap from the Debian mirror, kept as the local image
# localhost/tether-base:bookworm and as a root-file-system tarball under ~/.cache/tether/image.
#
#   scripts/image/build.sh [TAG]        TAG defaults to localhost/tether:<version in pyproject.toml>
#
# The compiled hot path is built in a stage of the Containerfile for the image's Python (Debian's 3.11),
# with ~/.cache/tether/native mounted so that unchanged sources compile nothing.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "scripts/image/build.sh: unknown option $1 (usage: scripts/image/build.sh [TAG])" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "scripts/image/build.sh: one TAG at most (usage: scripts/image/build.sh [TAG])" >&2; exit 2
fi
cd "$(dirname "$0")/../.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
TAG=${1:-localhost/tether:$VERSION}
BASE=localhost/tether-base:bookworm
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tether/image
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  if [ ! -s "$CACHE/bookworm-rootfs.tar" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    echo "image: debootstrap bookworm (minbase + python3, iptables, setcap) from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,iptables,libcap2-bin,ca-certificates \
      bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$CACHE/bookworm-rootfs.tar.tmp" . && mv "$CACHE/bookworm-rootfs.tar.tmp" "$CACHE/bookworm-rootfs.tar"
  fi
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$CACHE/bookworm-rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/sh "$ctr"
  buildah commit -q "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
  echo "image: base $BASE"
fi

# Behind a TLS-intercepting egress proxy, pip needs the host's CA bundle: mounted for the build only.
CA=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
ca_args=()
if [ -s "$CA" ]; then
  ca_args=(--volume "$CA:/tmp/build-ca.crt:ro" --build-arg PIP_CERT=/tmp/build-ca.crt)
fi
mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/tether/native"
buildah build --isolation chroot --network host --layers -f Containerfile --build-arg "BASE=$BASE" \
  --volume "${XDG_CACHE_HOME:-$HOME/.cache}/tether/native:/root/.cache/tether/native" \
  "${ca_args[@]}" -t "$TAG" .
echo "image: $TAG"
