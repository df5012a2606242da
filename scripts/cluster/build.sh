#!/usr/bin/env bash
# Build (once) and cache every binary the local cluster runs, from Go modules and Debian packages:
#   Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl),
#   etcd, containerd (+ its runc shim and ctr), CoreDNS, kube-router (the NetworkPolicy
#   enforcer), helm, the pause image's binary; runc, the CNI plugins, iptables and ipset from Debian.
#
# The Go wrapper modules beside this script pin the versions (scripts/cluster/*/go.mod). Binaries
# land in ${SPENDWARDEN_CACHE:-~/.cache/spendwarden}/cluster/<key>/bin, <key> being a hash of this
# directory's files, so a version change builds into a new directory and an unchanged one is reused.
# Prints that bin directory on the last line of stdout; progress goes to stderr.
#
# About 25-35 minutes on 2 cores the first time (Kubernetes about half of it), then nothing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SPENDWARDEN_CACHE:-$HOME/.cache/spendwarden}
log() { echo "[cluster-build] $*" >&2; }

key=$(cd "$HERE" && cat */go.mod */*.go | sha256sum | cut -c1-12)
OUT=$CACHE/cluster/$key
BIN=$OUT/bin
mkdir -p "$BIN"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
# runc and the CNI plugins (bridge, host-local, loopback, portmap) need nothing newer than Debian's;
# iptables/ipset for kube-proxy and kube-router; buildah (+ uidmap) builds images without a Docker
# engine; mmdebstrap makes the base image locally, since no image registry is reachable.
apt_install runc containernetworking-plugins iptables ipset conntrack buildah uidmap mmdebstrap gcc libc6-dev

command -v go >/dev/null || export PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { log "Go is needed (go.dev toolchain >= 1.26 on PATH)"; exit 1; }
export CGO_ENABLED=0 GOFLAGS=-trimpath

built() { [ -x "$BIN/$1" ]; }
step() {  # step NAME... -- command: runs the command unless every NAME is already built
  local names=() all=1
  while [ "$1" != "--" ]; do names+=("$1"); built "$1" || all=0; shift; done
  shift
  [ $all = 1 ] && return 0
  local t=$(date +%s)
  log "building ${names[*]}"
  "$@" >&2
  for n in "${names[@]}"; do built "$n" || { log "$n missing after its build"; exit 1; }; done
  log "built ${names[*]} in $(( $(date +%s) - t ))s"
}

k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$HERE/k8s/go.mod")
minor=$(echo "$k8s_version" | cut -d. -f2)
# What `kubectl version` and the API's /version report (the Makefile would set these from git).
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
ldflags+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"

k8s_build() {
  (cd "$HERE/k8s" && go build -ldflags "$ldflags" -o "$BIN/" \
     k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
     k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
}
step kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy -- k8s_build
# kubectl of the same release: the tests and the quickstart drive the cluster with it (the machine's own
# kubectl may be several minors older than the server, beyond the supported skew).
step kubectl -- bash -c "cd '$HERE/k8s' && go build -ldflags '$ldflags' -o '$BIN/kubectl' k8s.io/kubernetes/cmd/kubectl"

step etcd -- bash -c "cd '$HERE/etcd' && go build -ldflags '-s -w' -o '$BIN/etcd' go.etcd.io/etcd/server/v3"

containerd_version=v2.4.2
step containerd containerd-shim-runc-v2 ctr -- env GOBIN="$BIN" go install -ldflags "-s -w \
  -X github.com/containerd/containerd/v2/version.Version=$containerd_version" -tags "no_btrfs no_devmapper no_zfs" \
  "github.com/containerd/containerd/v2/cmd/containerd@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$containerd_version" \
  "github.com/containerd/containerd/v2/cmd/ctr@$containerd_version"

step coredns -- bash -c "cd '$HERE/coredns' && go build -ldflags '-s -w' -o '$BIN/coredns' ."

step kube-router -- bash -c "cd '$HERE/kube-router' && go build -ldflags '-s -w' -o '$BIN/kube-router' \
  github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"

# The real helm binary, for `helm install` of the chart (tests/integration/e2e, the quickstart).
helm_version=v4.3.2
step helm -- env GOBIN="$BIN" go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version" \
  "helm.sh/helm/v4/cmd/helm@$helm_version"

# The pod sandbox's process: Kubernetes' own pause.c, linked statically so that the image needs no libc.
pause_src=$(cd "$HERE/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
step pause -- gcc -Os -static -Wall -Werror -DVERSION="spendwarden-local" -o "$BIN/pause" "$pause_src"

for tool in runc iptables ipset; do command -v $tool >/dev/null || { log "$tool missing"; exit 1; }; done
echo "$k8s_version" > "$OUT/kubernetes-version"
echo "$BIN"
