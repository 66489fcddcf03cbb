#!/usr/bin/env bash
# Build the pinned smallstep `step` CLI with `go install`, for the identity interop test
# (certificates made by `step certificate create` must be accepted by tether's identity service).
#
# The binary lands in ~/.cache/tether/tools/step-<version>/step; a binary already built at the pinned
# version is reused. Usage: scripts/tools/build-step.sh [--print-path]
set -euo pipefail

STEP_VERSION="${STEP_VERSION:-v0.28.7}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
tools_dir="$cache/tether/tools"
dest="$tools_dir/step-$STEP_VERSION"
bin="$dest/step"

if [[ "${1:-}" == "--print-path" ]]; then
    echo "$bin"
    exit 0
fi
if [[ -x "$bin" ]]; then
    echo "step $STEP_VERSION: present at $bin"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go is not on PATH; install a Go toolchain (1.22 or newer) first" >&2
    exit 1
fi
export GOMODCACHE="$cache/tether/go/mod"
export GOCACHE="$cache/tether/go/build"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
mkdir -p "$tools_dir"
# Build into a scratch directory and rename it into place so an interrupted build is never mistaken
# for a finished one.
tmp="$(mktemp -d "$tools_dir/.step-$STEP_VERSION.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "step $STEP_VERSION: building github.com/smallstep/cli/cmd/step@$STEP_VERSION"
GOBIN="$tmp" nice -n 10 go install -p 1 "github.com/smallstep/cli/cmd/step@$STEP_VERSION"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "step $STEP_VERSION: built $bin"
