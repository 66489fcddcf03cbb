#!/usr/bin/env bash
# Build the contract-test client (tests/contract/goclient): a Go program over the published Go stubs
# of github.com/linkerd/linkerd2-proxy-api (pinned at v0.20.0 in its go.mod/go.sum), used to prove
# tether's control-plane API is the same wire contract.
#
# The binary lands in ~/.cache/tether/tools/goclient-<hash of its sources>/goclient and is reused
# while the sources are unchanged; modules and build cache live under ~/.cache/tether/go.
#
# Usage: scripts/tools/build-goclient.sh               (build if needed; prints the path)
#        scripts/tools/build-goclient.sh --print-path  (the path it would have; no build)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="$root/tests/contract/goclient"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export GOMODCACHE="$cache/tether/go/mod"
export GOCACHE="$cache/tether/go/build"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    PATH="/usr/local/go/bin:$PATH"
fi

hash="$(cd "$src" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)"
dest="$cache/tether/tools/goclient-$hash"
bin="$dest/goclient"
if [[ "${1:-}" == "--print-path" ]]; then
    echo "$bin"
    exit 0
fi
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go is not on PATH; install a Go toolchain (1.25 or newer) first" >&2
    exit 1
fi
mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
(cd "$src" && go build -trimpath -o "$tmp/goclient" .) >&2
mv "$tmp/goclient" "$bin"
echo "$bin"
