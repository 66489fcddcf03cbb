#!/usr/bin/env bash
# Build an OpenTelemetry Collector for the tracing tests: the OTLP receiver (gRPC 4317, HTTP 4318),
# the batch processor, and the file and debug exporters, assembled by the collector's own builder
# (go.opentelemetry.io/collector/cmd/builder) from a manifest written here.
#
# The binary lands in ~/.cache/tether/tools/otelcol-<version>/otelcol-tether; one already built at
# the pinned version is reused. Usage: scripts/tools/build-otelcol.sh [--print-path]
set -euo pipefail

OTELCOL_VERSION="${OTELCOL_VERSION:-v0.120.0}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
tools_dir="$cache/tether/tools"
dest="$tools_dir/otelcol-$OTELCOL_VERSION"
bin="$dest/otelcol-tether"

if [[ "${1:-}" == "--print-path" ]]; then
    echo "$bin"
    exit 0
fi
if [[ -x "$bin" ]]; then
    echo "otelcol $OTELCOL_VERSION: present at $bin"
    exit 0
fi
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    PATH="/usr/local/go/bin:$PATH"
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
tmp="$(mktemp -d "$tools_dir/.otelcol-$OTELCOL_VERSION.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "otelcol $OTELCOL_VERSION: building the builder"
GOBIN="$tmp/bin" nice -n 10 go install -p 1 "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION"

v="$OTELCOL_VERSION"
cat > "$tmp/manifest.yaml" <<MANIFEST
dist:
  name: otelcol-tether
  description: OpenTelemetry Collector for tether's tracing tests
  output_path: $tmp/out
receivers:
  - gomod: go.opentelemetry.io/collector/receiver/otlpreceiver $v
processors:
  - gomod: go.opentelemetry.io/collector/processor/batchprocessor $v
exporters:
  - gomod: go.opentelemetry.io/collector/exporter/debugexporter $v
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter $v
MANIFEST

echo "otelcol $OTELCOL_VERSION: building the collector"
GOFLAGS="$GOFLAGS -p=1" nice -n 10 "$tmp/bin/builder" --config "$tmp/manifest.yaml"
mkdir -p "$tmp/final"
mv "$tmp/out/otelcol-tether" "$tmp/final/otelcol-tether"
rm -rf "$dest"
mv "$tmp/final" "$dest"
echo "otelcol $OTELCOL_VERSION: built $bin"
