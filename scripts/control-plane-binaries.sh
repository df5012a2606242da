#!/usr/bin/env bash
# Obtain etcd, kube-apiserver and kube-controller-manager for the local control plane.
#
# No Debian package ships kube-apiserver, so it is built from bookworm's `kubernetes` source package
# (the full 1.20 upstream tree with vendor/). The result is cached outside the repo and reused:
#   ${SPENDWARDEN_CACHE:-~/.cache/spendwarden}/k8s-1.20.2/bin/{etcd,kube-apiserver,kube-controller-manager}
# Prints the bin directory on the last line of stdout.
set -euo pipefail

CACHE=${SPENDWARDEN_CACHE:-$HOME/.cache/spendwarden}
K8S_VERSION=1.20.5+really1.20.2-1.1+deb12u1
OUT=$CACHE/k8s-1.20.2
BIN=$OUT/bin
log() { echo "[control-plane] $*" >&2; }

have_all() { [ -x "$BIN/etcd" ] && [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; }
if have_all; then echo "$BIN"; exit 0; fi
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

apt_install etcd-server golang-1.19-go rsync dpkg-dev golang-github-modern-go-reflect2-dev make
ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$BIN/etcd"

if [ ! -x "$BIN/kube-apiserver" ] || [ ! -x "$BIN/kube-controller-manager" ]; then
  SRC=$CACHE/src
  mkdir -p "$SRC/apt/lists/partial" "$SRC/apt/sources.d"
  # A private deb-src list: the system's apt sources stay untouched.
  cat > "$SRC/apt/sources.list" <<LIST
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian-security bookworm-security main
LIST
  APTOPTS=(-o "Dir::Etc::SourceList=$SRC/apt/sources.list" -o "Dir::Etc::SourceParts=$SRC/apt/sources.d"
           -o "Dir::State::Lists=$SRC/apt/lists" -o "Debug::NoLocking=1")
  TREE=$(ls -d "$SRC"/kubernetes-1.20.*/ 2>/dev/null | head -1 || true)
  if [ -z "$TREE" ]; then
    log "fetching Debian source package kubernetes $K8S_VERSION"
    apt-get "${APTOPTS[@]}" update -qq >&2
    (cd "$SRC" && apt-get "${APTOPTS[@]}" source --download-only "kubernetes=$K8S_VERSION" >&2)
    (cd "$SRC" && dpkg-source --skip-patches -x kubernetes_*.dsc >&2)
    TREE=$(ls -d "$SRC"/kubernetes-1.20.*/ | head -1)
  fi
  cd "$TREE"
  # reflect2 1.0.1 segfaults under go >= 1.18 (mapiterinit); Debian ships the fixed 1.0.2.
  if [ ! -f vendor/github.com/modern-go/reflect2/.spendwarden-replaced ]; then
    log "replacing vendored reflect2 with Debian's 1.0.2"
    rm -rf vendor/github.com/modern-go/reflect2
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
    touch vendor/github.com/modern-go/reflect2/.spendwarden-replaced
  fi
  export PATH=/usr/lib/go-1.19/bin:$PATH GOFLAGS=-mod=vendor GO111MODULE=off
  export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean
  start=$(date +%s)
  log "building (about 8-10 minutes on 2 cores); progress follows"
  [ -f .spendwarden-generated ] || { make generated_files >&2 && touch .spendwarden-generated; }
  log "generated files done after $(( $(date +%s) - start ))s; building kube-apiserver"
  make WHAT=cmd/kube-apiserver >&2
  log "kube-apiserver done after $(( $(date +%s) - start ))s; building kube-controller-manager"
  make WHAT=cmd/kube-controller-manager >&2
  log "build finished in $(( $(date +%s) - start ))s"
  for b in kube-apiserver kube-controller-manager; do
    cp "$(ls _output/local/bin/*/*/$b _output/bin/$b 2>/dev/null | head -1)" "$BIN/$b"
  done
fi
have_all || { log "binaries missing after build"; exit 1; }
echo "$BIN"
