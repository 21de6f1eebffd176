# shellcheck shell=bash
# Helpers shared by tests/env/*.sh (sourced, not run).
shopt -s inherit_errexit   # set -e also inside $(...)

AWXTO_CACHE="${AWXTO_CACHE:-$HOME/.cache/awx-token-operator}"
# shellcheck disable=SC2034  # used by the scripts that source this file
KUBE_CACHE_DIR="$AWXTO_CACHE/kube-v1.20.2"                 # kube-apiserver, kube-controller-manager, etcd
# shellcheck disable=SC2034
TOOLS_CACHE_DIR="$AWXTO_CACHE/kubectl-1.37.1-helm-4.3.1"   # kubectl, helm

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
# since T0: seconds elapsed since T0 (from now), e.g. "1.23s"
since() { LC_ALL=C awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2fs", b - a }'; }

# first_exe CANDIDATE...: print the first candidate that is an executable file
first_exe() {
  local c
  for c in "$@"; do
    if [ -n "$c" ] && [ -f "$c" ] && [ -x "$c" ]; then printf '%s\n' "$c"; return 0; fi
  done
  return 1
}
on_path() { command -v "$1" 2>/dev/null || true; }

# same_dir_or_links PATH...: print the directory holding all PATHs (by their names), or, when they
# are spread out, a directory of symlinks to them under $AWXTO_CACHE/links/.
same_dir_or_links() {
  local d p tmp
  d="$(dirname "$1")"
  for p in "$@"; do [ "$(dirname "$p")" = "$d" ] || d=; done
  if [ -n "$d" ]; then (cd "$d" && pwd); return 0; fi
  d="$AWXTO_CACHE/links/$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  if [ ! -d "$d" ]; then
    mkdir -p "$AWXTO_CACHE/links"
    tmp="$(mktemp -d "$d.XXXXXX")"
    for p in "$@"; do ln -s "$(cd "$(dirname "$p")" && pwd)/${p##*/}" "$tmp/${p##*/}"; done
    chmod 755 "$tmp"
    mv -T "$tmp" "$d" 2>/dev/null || rm -rf "$tmp"   # lost a race: same content is there
  fi
  printf '%s\n' "$d"
}

# alive PID: the process exists and is not a zombie
alive() {
  local s
  s="$(ps -o stat= -p "$1" 2>/dev/null)" && [ "${s:0:1}" != Z ]
}

# stop_pidfile FILE [MATCH] [GRACE]: stop the process whose pid FILE holds (SIGTERM, SIGKILL after
# GRACE seconds, default 10), wait for it to end, remove FILE. Safe when FILE is missing or the
# process is gone. With MATCH, only a process whose command line contains MATCH is signalled
# (guards against a reused pid). A process leading its own process group (started with setsid)
# is stopped with its whole group.
stop_pidfile() {
  local f="$1" match="${2:-}" grace="${3:-10}" pid target
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid"; then
    if [ -n "$match" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$match"; then
      log "pid $pid in $f is no longer ours; not signalled"
    else
      target="$pid"
      [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] && target="-$pid"
      kill -TERM -- "$target" 2>/dev/null || true
      for _ in $(seq $((grace * 10))); do alive "$pid" || break; sleep 0.1; done
      if alive "$pid"; then
        kill -KILL -- "$target" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
      fi
    fi
  fi
  rm -f "$f"
}
