#!/usr/bin/env bash
# Install the Debian packages the cluster tests need (tests/test_cluster_infra.py, tests/test_container.py):
#   fake hosts:  iproute2 (ip netns), util-linux (unshare/nsenter), openssh-server/-client, pdsh
#   Slurm:       slurm-wlm, munge
#   DeepSpeed:   numactl (--bind_cores_to_rank), openmpi-bin (--launcher openmpi; mpi4py from pip: make cluster-deps)
# Optional, WITH_CONTAINERS=1: podman buildah runc fuse-overlayfs uidmap debootstrap (scripts/container_smoke.sh,
#   scripts/build_image.sh) and docker-registry (the registry:2 distribution, for scripts/push_image.sh).
# Idempotent (only missing packages are installed), quiet, run as root on Debian 12.
# Services are never started by the install: sshd/munged/slurm* would otherwise listen on this machine;
# the tests start their own private daemons.
set -euo pipefail

PKGS=(iproute2 util-linux openssh-server openssh-client pdsh slurm-wlm munge numactl procps openmpi-bin)
if [ "${WITH_CONTAINERS:-0}" = 1 ]; then
  PKGS+=(podman buildah runc fuse-overlayfs uidmap debootstrap docker-registry)
fi

die() { echo "install_cluster_deps: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (apt-get install)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} = 0 ]; then
  echo "install_cluster_deps: all present (${PKGS[*]})"
  exit 0
fi

# Keep the package scripts from starting daemons (no-op where a policy-rc.d already exists).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/install_cluster_deps.XXXXXX.log)
echo "install_cluster_deps: installing ${missing[*]}"
if ! apt-get update -qq >"$log" 2>&1; then
  tail -n 20 "$log" >&2; die "apt-get update failed (full log: $log)"
fi
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
  tail -n 20 "$log" >&2; die "apt-get install ${missing[*]} failed (full log: $log)"
fi
rm -f "$log"
echo "install_cluster_deps: done"
