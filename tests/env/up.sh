#!/usr/bin/env bash
# Bring up the end-to-end test environment under RUN_DIR and write RUN_DIR/env.sh, which exports
# KUBECONFIG, AWXTO_TEST_RUN_DIR, AWXTO_KUBE_BIN, AWXTO_TOOLS_BIN and PATH (kubectl, helm first).
#   usage: up.sh RUN_DIR      (stop with down.sh RUN_DIR; on failure up.sh stops what it started)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
[ $# = 1 ] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
mkdir -p "$1"
RUN_DIR="$(cd "$1" && pwd -P)"
t0="$(now)"

kube_bin="$("$HERE/kube-bin.sh" | tail -n 1)"
tools_bin="$("$HERE/tools-bin.sh" | tail -n 1)"
log "binaries ready in $(since "$t0")"

trap '[ $? = 0 ] || { log "failed; stopping what was started"; "$HERE/down.sh" "$RUN_DIR"; }' EXIT
AWXTO_KUBE_BIN="$kube_bin" "$HERE/cluster.sh" start "$RUN_DIR" >/dev/null

# ---- HOOK: other services -------------------------------------------------------------------
# The AWX stand-in (tests/awx-standin/standin.sh) is not started yet. To add it (or any service):
# start it here in the background, from its own dir "$RUN_DIR/<service>/", record its pid in
# "$RUN_DIR/<service>/pid" (down.sh stops every RUN_DIR/*/pid; start it with setsid so that its
# whole process group is stopped), wait until it answers, and add its exports to env.sh below.
# ---------------------------------------------------------------------------------------------

# shellcheck disable=SC2016  # $PATH is expanded when env.sh is sourced
{
  printf 'export KUBECONFIG=%q\n' "$RUN_DIR/kubeconfig"
  printf 'export AWXTO_TEST_RUN_DIR=%q\n' "$RUN_DIR"
  printf 'export AWXTO_KUBE_BIN=%q\n' "$kube_bin"
  printf 'export AWXTO_TOOLS_BIN=%q\n' "$tools_bin"
  printf 'export PATH=%q:"$PATH"\n' "$tools_bin"
} >"$RUN_DIR/env.sh"
log "environment up in $(since "$t0"); source $RUN_DIR/env.sh"
