#!/usr/bin/env bash
# Build the spendwarden image from the project's Dockerfile without a Docker engine (buildah), and
# write it as an OCI archive that the local cluster's node imports.
#
#   scripts/build-image.sh [NAME:TAG [DOCKERFILE]]   default spendwarden:dev from ./Dockerfile;
#                                                  prints the archive's path last
#
# The Dockerfile's base (python:3.11-slim-bookworm) comes from a registry that is unreachable here,
# so a base with the same Python is made locally with mmdebstrap (Debian bookworm's python3 3.11)
# and passed as PYTHON_IMAGE; where the registry is reachable, set SPENDWARDEN_PYTHON_IMAGE to use it.
# The archive is cached by a hash of the build context: an unchanged tree is not built again.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SPENDWARDEN_CACHE:-$HOME/.cache/spendwarden}
IMAGE=${1:-spendwarden:dev}
DOCKERFILE=${2:-$ROOT/Dockerfile}
log() { echo "[image] $*" >&2; }
mkdir -p "$CACHE/images"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
for tool in buildah mmdebstrap; do
  command -v $tool >/dev/null || {
    log "apt-get install buildah mmdebstrap uidmap"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends buildah mmdebstrap uidmap >&2
    break
  }
done
# buildah inside a machine without a container engine: plain chroot isolation, the host's network.
export BUILDAH_ISOLATION=chroot

BASE=${SPENDWARDEN_PYTHON_IMAGE:-localhost/spendwarden-python:3.11-bookworm}
if [ -z "${SPENDWARDEN_PYTHON_IMAGE:-}" ] && ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  t=$(date +%s)
  log "making the base image $BASE with mmdebstrap (Debian bookworm, python3 3.11)"
  rootfs=$(mktemp -d)/rootfs.tar
  # python-is-python3: the Dockerfile calls `python`, as in the official image; pip for `pip wheel`.
  # The machine's own extra CAs (a TLS-inspecting egress proxy in front of the package registries)
  # go into the base, as an organisation's base image carries its CA: builds then reach PyPI and
  # Debian as the host does. pip bundles its own CA list, so PIP_CERT points it at the system's.
  hooks=()
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    hooks=(--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share'
           --customize-hook='chroot "$1" update-ca-certificates')
  fi
  mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' "${hooks[@]}" bookworm "$rootfs" >&2
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$rootfs" / >&2
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --cmd python3 "$ctr"
  buildah commit --rm "$ctr" "$BASE" >&2
  rm -rf "$(dirname "$rootfs")"
  log "base image made in $(( $(date +%s) - t ))s"
fi

# The build context is what .dockerignore lets through: pyproject.toml, README.md, operator/.
key=$( (cat "$DOCKERFILE" && cd "$ROOT" && cat Dockerfile pyproject.toml README.md && find operator -type f -name '*.py' -o -type f -name '*.json' \
        -o -type f -name py.typed | grep -v __pycache__ | sort | xargs cat) | sha256sum | cut -c1-12)
ARCHIVE=$CACHE/images/${IMAGE//[:\/]/_}-$key.oci.tar
if [ ! -f "$ARCHIVE" ]; then
  t=$(date +%s)
  log "building $IMAGE from $DOCKERFILE on $BASE"
  buildah bud --layers --build-arg PYTHON_IMAGE="$BASE" \
    -t "localhost/$IMAGE" -f "$DOCKERFILE" "$ROOT" >&2
  rm -f "$CACHE/images/${IMAGE//[:\/]/_}"-*.oci.tar
  buildah push "localhost/$IMAGE" "oci-archive:$ARCHIVE.tmp:docker.io/library/$IMAGE" >&2
  mv "$ARCHIVE.tmp" "$ARCHIVE"
  log "built $IMAGE in $(( $(date +%s) - t ))s: $(du -h "$ARCHIVE" | cut -f1)"
fi
echo "$ARCHIVE"
