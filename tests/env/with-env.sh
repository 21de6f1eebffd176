#!/usr/bin/env bash
# Run CMD inside a fresh test environment (up.sh into a new temp run dir, env.sh sourced) and
# always tear it down (down.sh) afterwards. Exits with CMD's status.
#   usage: with-env.sh CMD [ARG...]        e.g. tests/env/with-env.sh cargo test --test e2e
# The run dir is removed when CMD succeeds; otherwise (or with AWXTO_KEEP_RUN_DIR=1) its logs are
# kept and its path printed. A SIGTERM sent to this script alone takes effect when CMD ends.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -gt 0 ] || { echo "usage: $0 CMD [ARG...]" >&2; exit 2; }
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/awxto-e2e.XXXXXX")"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  "$HERE/down.sh" "$RUN_DIR" || true
  if [ "$rc" = 0 ] && [ -z "${AWXTO_KEEP_RUN_DIR:-}" ]; then
    rm -rf "$RUN_DIR"
  else
    rm -rf "$RUN_DIR/etcd-data"
    echo "[with-env.sh] exit $rc; logs kept in $RUN_DIR" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$HERE/up.sh" "$RUN_DIR"
# shellcheck source=/dev/null
. "$RUN_DIR/env.sh"
"$@"   # under set -e a failing CMD exits here with its status; cleanup keeps that status
