#!/usr/bin/env bash
# Build the local Kubernetes test control plane from Go modules (issue 4).
#
#   scripts/kube/build.sh            build what is missing, print the bin directory last
#   scripts/kube/build.sh --print-bin-dir   print the bin directory and exit (no build)
#
# Binaries land in ${TETHER_KUBE_CACHE:-~/.cache/tether/kube}/<kubernetes version>/bin:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm, and
# kwok-stages.yaml (kwok's node/pod lifecycle stages, taken from the kwok module).
# Each group carries a stamp file naming the version it was built from; a group whose stamp
# matches versions.env is reused, so a second run costs a few file checks.
# Go modules and the build cache are shared under the same root (gomod/, gocache/), so a
# version bump recompiles only what changed (TETHER_KUBE_TRIM_CACHE=1 trades that for ~5 GB of
# disk). Needs only the Go toolchain (>= GO_MIN_VERSION)
# and the Go module proxy; nothing is installed outside the cache directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${here}/versions.env"

cache_root="${TETHER_KUBE_CACHE:-${HOME}/.cache/tether/kube}"
bin_dir="${cache_root}/${KUBERNETES_VERSION}/bin"

if [[ "${1:-}" == "--print-bin-dir" ]]; then
    echo "${bin_dir}"
    exit 0
fi

log() { printf '[kube-build] %s\n' "$*" >&2; }

# The official tarball's place, for shells whose PATH leaves it out (e.g. a CI environment).
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
    export PATH="/usr/local/go/bin:${PATH}"
fi
if ! command -v go >/dev/null 2>&1; then
    log "the Go toolchain (go >= ${GO_MIN_VERSION}) is not on PATH; install it first"
    exit 2
fi
go_version="$(go env GOVERSION)"   # e.g. go1.26.8
go_version="${go_version#go}"
if [[ "$(printf '%s\n%s\n' "${GO_MIN_VERSION}" "${go_version}" | sort -V | head -n1)" != "${GO_MIN_VERSION}" ]]; then
    log "go ${go_version} is older than ${GO_MIN_VERSION}, which the pinned modules need"
    exit 2
fi

mkdir -p "${bin_dir}" "${cache_root}/gomod" "${cache_root}/gocache"
# One build at a time per cache (a test run and a person may both call this script).
if command -v flock >/dev/null 2>&1; then
    exec 9>"${cache_root}/.build.lock"
    flock 9
fi
export GOMODCACHE="${cache_root}/gomod"
export GOCACHE="${cache_root}/gocache"
export GOFLAGS="-trimpath -mod=mod -buildvcs=false"
export GOTOOLCHAIN=local    # never download another toolchain
export CGO_ENABLED=0        # static binaries, no C compiler needed
export GOWORK=off

work_root="$(mktemp -d "${TMPDIR:-/tmp}/tether-kube-build.XXXXXX")"
trap 'rm -rf "${work_root}"' EXIT

# stamp_ok GROUP VERSION BIN...: true when every binary exists and the group's stamp matches.
stamp_ok() {
    local group="$1" version="$2"
    shift 2
    [[ -f "${bin_dir}/.${group}.version" ]] || return 1
    [[ "$(cat "${bin_dir}/.${group}.version")" == "${version}" ]] || return 1
    local b
    for b in "$@"; do
        [[ -x "${bin_dir}/${b}" ]] || return 1
    done
}

# new_module GROUP: an empty module directory for building one group's binaries.
new_module() {
    local dir="${work_root}/$1"
    mkdir -p "${dir}"
    printf 'module tether.local/kubebuild/%s\n\ngo %s\n' "$1" "${GO_MIN_VERSION}" >"${dir}/go.mod"
    echo "${dir}"
}

built_log="${work_root}/built.log"
: >"${built_log}"
# timed GROUP CMD...: run the build command niced, record how long it took.
timed() {
    local group="$1"
    shift
    local start end
    start=$(date +%s)
    log "building ${group} ..."
    nice -n 10 "$@"
    end=$(date +%s)
    echo "${group} $((end - start))s" >>"${built_log}"
    log "built ${group} in $((end - start))s"
}

total_start=$(date +%s)

# ---- kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl ----------
k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
if stamp_ok kubernetes "${KUBERNETES_VERSION}" "${k8s_bins[@]}"; then
    log "kubernetes ${KUBERNETES_VERSION}: cached"
else
    mod="$(new_module kubernetes)"
    staging_version="v0.${KUBERNETES_VERSION#v1.}"   # v1.37.2 -> v0.37.2
    (
        cd "${mod}"
        go mod edit -require="k8s.io/kubernetes@${KUBERNETES_VERSION}"
        # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
        # ./staging/src/...; those replaces are ignored in a dependency, so pin each one to the
        # published twin of the same release.
        k8s_gomod="$(go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" |
            sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
        [[ -f "${k8s_gomod}" ]] || { log "could not download k8s.io/kubernetes@${KUBERNETES_VERSION}"; exit 1; }
        staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/.*#\1#p' "${k8s_gomod}")
        [[ -n "${staging}" ]] || { log "no staging replaces found in ${k8s_gomod}"; exit 1; }
        for m in ${staging}; do
            go mod edit -replace="${m}=${m}@${staging_version}"
        done
        ldflags="-s -w"
        minor="${KUBERNETES_VERSION#v1.}"
        minor="${minor%%.*}"
        for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ldflags+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION}"
            ldflags+=" -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
            ldflags+=" -X ${pkg}.gitTreeState=clean"
            ldflags+=" -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
        done
        pkgs=()
        for b in "${k8s_bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/${b}"); done
        timed kubernetes go build -ldflags="${ldflags}" -o "${mod}/out/" "${pkgs[@]}"
        for b in "${k8s_bins[@]}"; do mv -f "${mod}/out/${b}" "${bin_dir}/${b}"; done
    )
    echo "${KUBERNETES_VERSION}" >"${bin_dir}/.kubernetes.version"
fi

# build_simple GROUP VERSION MODULE PKG BIN [LDFLAGS]: build one main package of one module.
build_simple() {
    local group="$1" version="$2" module="$3" pkg="$4" bin="$5" ldflags="${6:-}"
    if stamp_ok "${group}" "${version}" "${bin}"; then
        log "${group} ${version}: cached"
        return 0
    fi
    local mod
    mod="$(new_module "${group}")"
    (cd "${mod}" && go mod edit -require="${module}@${version}")
    (cd "${mod}" && timed "${group}" go build -ldflags="-s -w ${ldflags}" -o "${mod}/${bin}" "${pkg}")
    mv -f "${mod}/${bin}" "${bin_dir}/${bin}"
    echo "${version}" >"${bin_dir}/.${group}.version"
}

build_simple etcd "${ETCD_VERSION}" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 etcd
build_simple kwok "${KWOK_VERSION}" sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok kwok \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}"
# kwok refuses to start without lifecycle stages; ship the module's own "fast" stages (node
# initialize, lease heartbeat, pod ready/complete/delete) next to the binary as one config file.
stages="${bin_dir}/kwok-stages.yaml"
if [[ ! -s "${stages}" || "$(head -n1 "${stages}")" != "# kwok ${KWOK_VERSION} stages" ]]; then
    kwok_dir="$(go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    {
        echo "# kwok ${KWOK_VERSION} stages"
        for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
            pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
            echo "---"
            cat "${kwok_dir}/kustomize/stage/${f}"
        done
    } >"${stages}.tmp"
    mv -f "${stages}.tmp" "${stages}"
fi
build_simple helm "${HELM_VERSION}" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm helm \
    "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"

# The Go build cache (~5 GB after a cold build) only speeds up rebuilds after a version bump;
# TETHER_KUBE_TRIM_CACHE=1 drops it once the binaries are in place (the module cache is kept).
if [[ "${TETHER_KUBE_TRIM_CACHE:-0}" == "1" ]]; then
    go clean -cache
    log "trimmed the Go build cache ${GOCACHE}"
fi

total_end=$(date +%s)
if [[ ! -s "${built_log}" ]]; then
    log "nothing to build: all binaries cached in ${bin_dir}"
else
    while read -r line; do log "built: ${line}"; done <"${built_log}"
fi
log "total $((total_end - total_start))s; binaries in ${bin_dir}"
echo "${bin_dir}"
