#!/usr/bin/env bash
# Build the pinned Go tools (fortio, h2spec, grpcurl) with `go install`.
#
# Each tool lands in ~/.cache/tether/tools/<name>-<version>/<name>; a tool already built at the pinned
# version is reused, so the script is idempotent and cheap to run again. Module and build caches live
# under ~/.cache as well, so a rebuild after a version bump only fetches what changed.
#
# Usage: scripts/tools/build-go-tools.sh [fortio|h2spec|grpcurl ...]   (default: all)
#        scripts/tools/build-go-tools.sh --print-path NAME               (path of a built tool)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
tools_dir="$cache/tether/tools"
export GOMODCACHE="$cache/tether/go/mod"
export GOCACHE="$cache/tether/go/build"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
# The toolchain's usual home, for shells whose PATH lacks it (CI, cron).
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    PATH="/usr/local/go/bin:$PATH"
fi

# name -> "<package>|<version>"
spec() {
    case "$1" in
        fortio)  echo "fortio.org/fortio|$FORTIO_VERSION" ;;
        h2spec)  echo "github.com/summerwind/h2spec/cmd/h2spec|$H2SPEC_VERSION" ;;
        grpcurl) echo "github.com/fullstorydev/grpcurl/cmd/grpcurl|$GRPCURL_VERSION" ;;
        *) echo "unknown tool: $1 (known: fortio h2spec grpcurl)" >&2; return 1 ;;
    esac
}

tool_path() {
    local s version
    s="$(spec "$1")"
    version="${s#*|}"
    echo "$tools_dir/$1-$version/$1"
}

build() {
    local name="$1" s pkg version dest bin tmp
    s="$(spec "$name")"
    pkg="${s%|*}"
    version="${s#*|}"
    dest="$tools_dir/$name-$version"
    bin="$dest/$name"
    if [[ -x "$bin" ]]; then
        echo "$name $version: present at $bin"
        return 0
    fi
    if ! command -v go >/dev/null 2>&1; then
        echo "go is not on PATH; install a Go toolchain (1.22 or newer) first" >&2
        return 1
    fi
    echo "$name $version: building $pkg@$version"
    mkdir -p "$tools_dir"
    # Install into a scratch directory and rename it into place, so an interrupted build never leaves a
    # half-written directory that a later run would take for a finished one.
    tmp="$(mktemp -d "$tools_dir/.$name-$version.XXXXXX")"
    scratch="$tmp"
    GOBIN="$tmp" nice -n 10 go install "$pkg@$version"
    chmod 755 "$tmp"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    scratch=""
    echo "$name $version: built $bin"
}

# A failed `go install` exits the script (set -e); remove its scratch directory on the way out.
scratch=""
trap '[[ -n "$scratch" ]] && rm -rf "$scratch"' EXIT

if [[ "${1:-}" == "--print-path" ]]; then
    [[ $# -eq 2 ]] || { echo "usage: $0 --print-path NAME" >&2; exit 2; }
    tool_path "$2"
    exit 0
fi

if [[ $# -eq 0 ]]; then
    set -- fortio h2spec grpcurl
fi
for name in "$@"; do
    build "$name"
done
