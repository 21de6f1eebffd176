#!/usr/bin/env bash
# The image's whole filesystem, built into DIR: the operator as a statically linked release
# binary, the CA bundle, and passwd/group/nsswitch entries for user 65532. Nothing else: no
# shell, no libc to load, no package manager.
#   usage: image/rootfs.sh DIR       (DIR is replaced; run from anywhere)
# The Dockerfile's build stage runs exactly this (`RUN image/rootfs.sh /rootfs`, on Debian
# bookworm with the Rust toolchain), and image/build.sh runs it on this machine and hands the
# result to the same Dockerfile in place of that stage: one script makes both images' content.
#
# Static glibc (crt-static) rather than musl: the toolchain here has no musl target, and
# glibc 2.34 and later carry the "files" and "dns" name services inside libc itself, so a
# static binary still reads /etc/hosts and /etc/resolv.conf (nsswitch.conf below) without
# loading any shared library. TLS is rustls with ring: no OpenSSL. Cargo's target dir is
# $CARGO_TARGET_DIR (default target/); the release build there is reused when nothing changed.
set -euo pipefail
[ $# = 1 ] || { sed -n '2,6s/^# \{0,1\}//p' "$0" >&2; exit 2; }
out="$1"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf '[rootfs.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- the binary -----------------------------------------------------------------------------
triple="$(rustc -vV | sed -n 's/^host: //p')"
case "$triple" in *-linux-gnu) ;; *) die "expected a *-linux-gnu host toolchain, found '$triple'" ;; esac
target_dir="${CARGO_TARGET_DIR:-target}"
# With --target, RUSTFLAGS reach only the binary and its dependencies, not build scripts and
# proc macros (which run here, dynamically linked); set here so that nothing inherited decides.
t0="$(date +%s.%N)"
env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --bin awx-token-operator --target "$triple"
bin="$target_dir/$triple/release/awx-token-operator"
log "cargo build --release ($triple, crt-static) took $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f s", b - a }')"

# Static: no program interpreter and no shared library needed (readelf comes with binutils,
# which the linker needs anyway).
if readelf -lW "$bin" | grep -q 'program interpreter'; then die "$bin has a program interpreter: not static"; fi
if readelf -dW "$bin" | grep -q '(NEEDED)'; then die "$bin needs shared libraries: $(readelf -dW "$bin" | grep NEEDED)"; fi
"$bin" --version >/dev/null || die "$bin does not run"
if command -v file >/dev/null; then log "$(file -b "$bin" | cut -d, -f1-4)"; fi

# ---- the filesystem -------------------------------------------------------------------------
ca=/etc/ssl/certs/ca-certificates.crt   # Debian's ca-certificates: the Mozilla roots
grep -q 'BEGIN CERTIFICATE' "$ca" 2>/dev/null || die "no CA bundle at $ca (install ca-certificates)"

rm -rf "$out"
mkdir -p "$out/etc/ssl/certs" "$out/tmp" "$out/home/nonroot"
# Symbols stripped (a quarter of the size): panics still print their message and location.
install -m 0755 --strip "$bin" "$out/awx-token-operator"
install -m 0644 "$ca" "$out/etc/ssl/certs/ca-certificates.crt"
# The users of distroless' "nonroot" image: 65532 is the chart's runAsUser/runAsGroup.
cat >"$out/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$out/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
GROUP
# Without this file glibc asks DNS before /etc/hosts.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$out/etc/nsswitch.conf"
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/nsswitch.conf"
chmod 1777 "$out/tmp"
chmod 0755 "$out/home/nonroot"
# Fixed times: the same files give the same layer.
find "$out" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
log "binary $(stat -c %s "$out/awx-token-operator") bytes; rootfs $(du -sb "$out" | cut -f1) bytes in $out"
