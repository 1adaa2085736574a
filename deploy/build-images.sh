#!/usr/bin/env bash
# Build the mesh's container images with podman, from Debian packages only (no registry needed):
#   localhost/exegpt-base:bookworm      debootstrap --variant=minbase bookworm, imported
#   localhost/exegpt:latest             Python 3.11 venv at /opt/venv, torch 2.13.0 CPU, SmolLM2, this project
#   localhost/exegpt-rabbitmq:latest    Debian rabbitmq-server
#   localhost/exegpt-redis:latest       Debian redis-server
#   localhost/exegpt-prometheus:latest  Debian prometheus
# Idempotent: the base image is made only when missing (--rebuild-base remakes it); the others
# are rebuilt with podman's layer cache, so an unchanged image takes seconds.
# Prints the seconds each image took. Environment:
#   EXEGPT_DEBIAN_MIRROR  (default http://deb.debian.org/debian, as this machine's apt)
#   EXEGPT_TORCH_WHEEL    path of the torch 2.13.0 CPU wheel (default: found via pip's find-links)
#   EXEGPT_BUILD_DIR      staging folder for build contexts (default /var/tmp/exegpt-build)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REBUILD_BASE=0
ONLY=()
for arg in "$@"; do
  case $arg in
    --rebuild-base) REBUILD_BASE=1 ;;
    base|exegpt|rabbitmq|redis|prometheus) ONLY+=("$arg") ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (--rebuild-base, or image names: base exegpt rabbitmq redis prometheus)" ;;
  esac
done
((${#ONLY[@]})) || ONLY=(base exegpt rabbitmq redis prometheus)
wanted() { local x; for x in "${ONLY[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }

MIRROR=${EXEGPT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${EXEGPT_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BUILD_DIR=${EXEGPT_BUILD_DIR:-/var/tmp/exegpt-build}
TORCH_VERSION=2.13.0
BASE=localhost/exegpt-base:bookworm

ensure_tools
mkdir -p "$BUILD_DIR"
declare -A TOOK=()

# --- base: debootstrap -> podman import --------------------------------------------------------
build_base() {
  if [ "$REBUILD_BASE" = 0 ] && podman image exists "$BASE"; then
    log "$BASE exists (--rebuild-base to remake it)"; TOOK[base]="0 (exists)"; return
  fi
  local t0=$SECONDS rootfs="$BUILD_DIR/rootfs"
  [ -d "$rootfs" ] && { umount "$rootfs/proc" 2>/dev/null || true; rm -rf "$rootfs"; }
  log "debootstrap --variant=minbase bookworm from $MIRROR"
  timeout 1800 debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$BUILD_DIR/debootstrap.log" 2>&1 ||
    { tail -20 "$BUILD_DIR/debootstrap.log" >&2; die "debootstrap (log: $BUILD_DIR/debootstrap.log)"; }
  # apt inside the images: bookworm, -updates and -security; no recommends, docs or caches.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >"$rootfs/etc/apt/apt.conf.d/90exegpt" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/90exegpt-nodoc" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
DPKG
  # no service starts from a package's maintainer scripts inside an image
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"; chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  # security and point updates of what debootstrap installed
  mount -t proc proc "$rootfs/proc"
  trap 'umount "'"$rootfs"'/proc" 2>/dev/null || true' EXIT
  { chroot "$rootfs" apt-get update -qq && DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get -y -qq upgrade; } \
    >>"$BUILD_DIR/debootstrap.log" 2>&1 || die "apt-get upgrade in the base rootfs"
  umount "$rootfs/proc"; trap - EXIT
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
    "$rootfs"/usr/share/doc/*/[!c]* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
  tar -C "$rootfs" --numeric-owner -c . |
    podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
      --message "debootstrap minbase bookworm $(date -u +%FT%TZ)" - "$BASE" >>"$BUILD_DIR/debootstrap.log" 2>&1
  rm -rf "$rootfs"
  TOOK[base]=$((SECONDS - t0))
}

# --- the app image's context: the project's packages and the local torch wheel -----------------
find_torch_wheel() {
  if [ -n "${EXEGPT_TORCH_WHEEL:-}" ]; then echo "$EXEGPT_TORCH_WHEEL"; return; fi
  local d links=("${PIP_FIND_LINKS:-}") w
  links+=($(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"))
  for d in "${links[@]}" /opt/wheels; do
    for w in "${d#file://}"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do
      [ -f "$w" ] && { echo "$w"; return; }
    done
  done
  # let pip resolve it from its configured sources; accept only a CPU build
  d="$BUILD_DIR/wheels"; mkdir -p "$d"
  timeout 900 python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$d" "torch==$TORCH_VERSION" >&2 || true
  for w in "$d"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do [ -f "$w" ] && { echo "$w"; return; }; done
  die "no torch $TORCH_VERSION CPU wheel for cp311 found; set EXEGPT_TORCH_WHEEL"
}

stage_exegpt() {
  local ctx="$BUILD_DIR/ctx-exegpt" wheel
  wheel=$(find_torch_wheel)
  log "torch wheel: $wheel"
  rm -rf "$ctx"; mkdir -p "$ctx/wheels" "$ctx/src" "$ctx/certs"
  # the CA bundle this machine's pip trusts (it may hold a TLS-inspecting proxy's CA): bind-mounted
  # into the pip steps only, never copied into the image
  cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ctx/certs/ca-certificates.crt"
  cp "$DEPLOY_DIR/images/exegpt/Containerfile" "$DEPLOY_DIR/images/exegpt/.containerignore" "$ctx/"
  ln -f "$wheel" "$ctx/wheels/" 2>/dev/null || cp "$wheel" "$ctx/wheels/"
  tar -C "$REPO_DIR" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    -c pyproject.toml README.md common services engine optimizer loadgen | tar -C "$ctx/src" -x
  echo "$ctx"
}

build_one() {  # name, context dir
  local name=$1 ctx=$2 tag t0=$SECONDS
  case $name in exegpt) tag=localhost/exegpt:latest ;; *) tag=localhost/exegpt-$name:latest ;; esac
  log "podman build $tag (context $(du -sh "$ctx" | cut -f1))"
  timeout 3600 podman build --layers --pull=never -t "$tag" -f "$ctx/Containerfile" "$ctx" \
    >"$BUILD_DIR/build-$name.log" 2>&1 ||
    { tail -30 "$BUILD_DIR/build-$name.log" >&2; die "podman build $tag (log: $BUILD_DIR/build-$name.log)"; }
  TOOK[$name]=$((SECONDS - t0))
}

wanted base && build_base
podman image exists "$BASE" || die "$BASE is missing (run $0 base)"
wanted exegpt && build_one exegpt "$(stage_exegpt)"
for svc in rabbitmq redis prometheus; do
  wanted $svc && build_one $svc "$DEPLOY_DIR/images/$svc"
done

echo "image build times (s):"
for n in base exegpt rabbitmq redis prometheus; do
  [ -n "${TOOK[$n]:-}" ] && printf '  %-11s %s\n' "$n" "${TOOK[$n]}"
done
podman images --filter reference='localhost/exegpt*' --format '  {{.Repository}}:{{.Tag}}  {{.Size}}'
