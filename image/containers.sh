#!/usr/bin/env bash
# Runs podman, buildah or skopeo on a container store of its own under STATE (created when
# missing), never the machine's: image/build.sh and the end-to-end suite use it.
#   usage: image/containers.sh STATE podman|buildah|skopeo [ARG...]
#          image/containers.sh STATE clean      remove STATE's containers, then STATE itself
# The store: driver vfs (plain directories, so no overlay mount outlives a killed run and any
# host filesystem works; each container costs a copy of the small image); no registry to search
# for short names (nothing is ever pulled); events and container logs in files (no journald).
# Rootful podman, no daemon: needs root.
# The OCI runtime is runc, not crun: crun 1.8 refuses to start any container on a host whose
# cgroups are in hybrid mode with a controller in the cgroup v2 part ("cgroups in hybrid mode
# not supported, drop all controllers from cgroupv2"), as on the VMs this project's CI runs on
# (v1 controllers, hugetlb on /sys/fs/cgroup/unified); runc handles v1, hybrid and v2. cgroupfs
# is the cgroup manager (no systemd). Default rlimits: podman as root asks for 1048576 open
# files, which a process without CAP_SYS_RESOURCE (as here) may not raise its hard limit to,
# so containers get this shell's hard limits (capped at 1048576 files, 32768 processes, what
# podman itself keeps).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,5s/^# \{0,1\}//p' "$0" >&2; exit 2; }
mkdir -p "$1"
state="$(cd "$1" && pwd -P)"
tool="$2"
shift 2
# The run root (locks, container state) may be at most 50 characters long: podman's exit
# command (`podman container cleanup`, run by conmon when a container ends) refuses a longer
# one, and `podman run` then waits 20 s for a cleanup that never comes. So it lives in /run
# under a hash of STATE, not in STATE.
runroot="/run/awxto-containers/$(printf '%s' "$state" | sha256sum | cut -c1-16)"

if [ "$tool" = clean ]; then
  if [ -f "$state/containers.conf" ] && command -v podman >/dev/null; then
    "$0" "$state" podman rm --all --force --time 0 >/dev/null 2>&1 || true
  fi
  rm -rf "$state" "$runroot"
  exit 0
fi
case "$tool" in podman | buildah | skopeo) ;; *) echo "unknown tool $tool (podman, buildah, skopeo)" >&2; exit 2 ;; esac

if [ ! -f "$state/containers.conf" ]; then
  mkdir -p "$state/storage" "$state/tmp"
  cat >"$state/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$state/storage"
runroot = "$runroot"
CONF
  cat >"$state/registries.conf" <<'CONF'
unqualified-search-registries = []
short-name-mode = "enforcing"
CONF
  nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
  { [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; } && nofile=1048576
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  cat >"$state/containers.conf.tmp" <<CONF
[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$state/tmp/events.log"
tmp_dir = "$state/tmp"
CONF
  mv "$state/containers.conf.tmp" "$state/containers.conf"
fi
export CONTAINERS_STORAGE_CONF="$state/storage.conf"
export CONTAINERS_CONF="$state/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$state/registries.conf"
export TMPDIR="$state/tmp"
exec "$tool" "$@"
