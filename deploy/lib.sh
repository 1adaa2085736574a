# Shared by build-images.sh and compose-smoke.sh (sourced, not run).
# podman settings for this kind of machine: runc, cgroupfs, ulimits the host's hard limits allow.
DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$DEPLOY_DIR/.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$DEPLOY_DIR/podman/containers.conf}"
PODMAN_COMPOSE_VERSION=1.6.0

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# Install podman (+runc, debootstrap) from Debian and podman-compose from PyPI when missing.
ensure_tools() {
  local pkgs=()
  command -v podman >/dev/null || pkgs+=(podman)
  command -v runc >/dev/null || pkgs+=(runc)
  command -v debootstrap >/dev/null || pkgs+=(debootstrap)
  [ -x /usr/lib/podman/aardvark-dns ] || [ -x /usr/libexec/podman/aardvark-dns ] || pkgs+=(aardvark-dns)
  if ((${#pkgs[@]})); then
    log "installing ${pkgs[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${pkgs[@]}" >/dev/null ||
      die "apt-get install ${pkgs[*]}"
  fi
}

ensure_compose() {
  if ! command -v podman-compose >/dev/null; then
    log "installing podman-compose==$PODMAN_COMPOSE_VERSION (pip)"
    timeout 600 python3 -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION" ||
      die "pip install podman-compose"
  fi
}
