#!/usr/bin/env bash
# Print (last stdout line) a directory holding kube-apiserver, kube-controller-manager and etcd.
#   usage: kube-bin.sh
# Each binary is taken from the first of: $KUBEBUILDER_ASSETS/NAME, $TEST_ASSET_KUBE_APISERVER /
# $TEST_ASSET_ETCD / $TEST_ASSET_KUBE_CONTROLLER_MANAGER, PATH. If kube-apiserver or etcd is not
# found that way, all three come from the cache $AWXTO_CACHE/kube-v1.20.2 (default AWXTO_CACHE:
# ~/.cache/awx-token-operator), which is built from Debian's source package when missing
# (build-kube-cp.sh: ~6 min on 2 cores, needs root for apt-get). A kube-controller-manager missing
# beside a user's kube-apiserver also comes from the cache. Progress goes to stderr.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

cache_ok() {
  local b
  for b in kube-apiserver kube-controller-manager etcd; do
    "$KUBE_CACHE_DIR/$b" --version >/dev/null 2>&1 || return 1
  done
}

# Make sure the cache is complete, building it if needed: one build at a time (flock), into a temp
# dir that is moved into place only when complete, so a killed build never leaves a half cache.
ensure_cache() {
  cache_ok && return 0
  mkdir -p "$AWXTO_CACHE/logs"
  exec 9>"$AWXTO_CACHE/kube-v1.20.2.lock"
  flock -n 9 || { log "another build is running; waiting for it"; flock 9; }
  cache_ok && return 0
  rm -rf "$KUBE_CACHE_DIR".tmp.*   # left by a killed run (we hold the lock)
  local buildlog="$AWXTO_CACHE/logs/kube-build.log" t0
  t0="$(now)"
  TMP_OUT="$(mktemp -d "$KUBE_CACHE_DIR.tmp.XXXXXX")"
  WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/awxto-kube-build.XXXXXX")"
  trap 'rm -rf "$TMP_OUT" "$WORK_DIR"' EXIT
  log "building kube-apiserver + kube-controller-manager v1.20.2 and etcd 3.4.23 from Debian sources"
  log "  (about 6 min on 2 cores; log: $buildlog)"
  if ! WORK="$WORK_DIR" "$HERE/build-kube-cp.sh" "$TMP_OUT" >"$buildlog" 2>&1; then
    tail -n 30 "$buildlog" >&2
    die "build failed; see $buildlog"
  fi
  chmod 755 "$TMP_OUT"
  rm -rf "$KUBE_CACHE_DIR"
  mv -T "$TMP_OUT" "$KUBE_CACHE_DIR"
  log "built into $KUBE_CACHE_DIR in $(since "$t0")"
}

ka="${KUBEBUILDER_ASSETS:-}"
apiserver="$(first_exe "${ka:+$ka/kube-apiserver}" "${TEST_ASSET_KUBE_APISERVER:-}" "$(on_path kube-apiserver)")" || true
etcd="$(first_exe "${ka:+$ka/etcd}" "${TEST_ASSET_ETCD:-}" "$(on_path etcd)")" || true
if [ -n "$apiserver" ] && [ -n "$etcd" ]; then
  kcm="$(first_exe "${ka:+$ka/kube-controller-manager}" "${TEST_ASSET_KUBE_CONTROLLER_MANAGER:-}" \
                   "$(on_path kube-controller-manager)")" || {
    ensure_cache
    kcm="$KUBE_CACHE_DIR/kube-controller-manager"
  }
  log "using $apiserver ($("$apiserver" --version)), $kcm, $etcd ($("$etcd" --version | sed -n 1p))"
  same_dir_or_links "$apiserver" "$kcm" "$etcd"
else
  ensure_cache
  log "using $KUBE_CACHE_DIR (kube v1.20.2, etcd 3.4.23)"
  printf '%s\n' "$KUBE_CACHE_DIR"
fi
