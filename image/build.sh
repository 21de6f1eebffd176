#!/usr/bin/env bash
# Builds the operator's image from the Dockerfile on a machine that reaches no container
# registry, checks it, and writes it as an OCI archive to load or push.
#   usage: image/build.sh [--rebuild]
# 1. image/rootfs.sh, the Dockerfile's build stage, runs here into OUT/context/rootfs.
# 2. buildah builds the Dockerfile itself with --build-context build=OUT/context: its runtime
#    stage (FROM scratch, labels, user, port, entrypoint) is taken as written, its
#    `COPY --from=build /rootfs/ /` reads what step 1 made, and the rust image of the build
#    stage is never pulled. A `docker build .` elsewhere gives the same layout: same script,
#    same runtime stage.
# 3. Checks: the image holds exactly the rootfs; labels (version = Cargo.toml's = the chart's
#    appVersion, licence = Cargo.toml's, source); user = the chart's runAsUser:runAsGroup;
#    port, entrypoint and command; `--version` runs in it as the chart runs it (read-only,
#    no capabilities).
# 4. OUT/awx-token-operator-VERSION.oci.tar, gzip layers (skopeo): `podman load -i FILE`, or
#    `skopeo copy oci-archive:FILE docker://REGISTRY/awx-token-operator:VERSION` to push.
# OUT is $AWXTO_IMAGE_DIR, default ~/.cache/awx-token-operator/image-VERSION. The slow part,
# cargo's release build, is cached in $CARGO_TARGET_DIR (cargo rebuilds what changed); the
# image is made anew every time (seconds) in a container store of its own, removed afterwards.
# --rebuild starts from nothing: removes OUT and the release build of the target first.
# Missing podman, buildah, skopeo or runc are installed with apt-get (as root). Sizes and
# times go to stderr; the last stdout line is the archive's path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
mb() { awk -v n="$1" 'BEGIN { printf "%.1f MB", n / 1000000 }'; }
rebuild=
case "${1:-}" in
  --rebuild) rebuild=1 ;;
  "") ;;
  *) sed -n '2,25s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
t_start="$(now)"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
license="$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
app="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/awx-token-operator/Chart.yaml)"
[ -n "$version" ] && [ "$app" = "$version" ] || die "the chart's appVersion '$app' is not Cargo.toml's version '$version'"
out="${AWXTO_IMAGE_DIR:-${AWXTO_CACHE:-$HOME/.cache/awx-token-operator}/image-$version}"
name="localhost/awx-token-operator:$version"
archive="$out/awx-token-operator-$version.oci.tar"

missing=()
for tool in podman buildah skopeo runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
    die "missing ${missing[*]}: install them (Debian: apt-get install podman buildah skopeo runc)"
  log "installing ${missing[*]} (apt-get)"
  t0="$(now)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman buildah skopeo runc >/dev/null
  log "installed in $(since "$t0")"
fi

if [ -n "$rebuild" ]; then
  log "--rebuild: removing $out and the release build"
  rm -rf "$out"
  # The binary (TARGET_DIR/TRIPLE/release) and its build scripts and proc macros (TARGET_DIR/release).
  cargo clean --release --target "$(rustc -vV | sed -n 's/^host: //p')"
  cargo clean --release
fi
mkdir -p "$out"

# ---- 1. the build stage, here ----------------------------------------------------------------
t0="$(now)"
image/rootfs.sh "$out/context/rootfs"
t_rootfs="$(since "$t0")"

# ---- 2. the Dockerfile, with that result as its build stage ----------------------------------
store="$(mktemp -d "$out/store.XXXXXX")"
trap 'image/containers.sh "$store" clean' EXIT
ctr() { image/containers.sh "$store" "$@"; }
t0="$(now)"
# --identity-label=false: no buildah version label, the labels are the Dockerfile's alone.
# The image's creation time is the last commit's, so rebuilding a commit gives the same config.
created="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
ctr buildah bud --quiet --pull=never --identity-label=false --timestamp "$created" \
  --build-context "build=$out/context" -f Dockerfile -t "$name" . >/dev/null
t_bud="$(since "$t0")"

# ---- 3. checks -------------------------------------------------------------------------------
# The image holds the rootfs and nothing else.
c="$(ctr buildah from --pull=never "$name")"
mnt="$(ctr buildah mount "$c")"
diff -r --no-dereference "$mnt" "$out/context/rootfs" >&2 || die "the image's files differ from $out/context/rootfs"
ctr buildah umount "$c" >/dev/null
ctr buildah rm "$c" >/dev/null

# The config: what the chart's Deployment relies on.
uids="$(sed -n 's/^ *runAsUser: *\([0-9]*\) *$/\1/p' charts/awx-token-operator/values.yaml | sort -u)"
gids="$(sed -n 's/^ *runAsGroup: *\([0-9]*\) *$/\1/p' charts/awx-token-operator/values.yaml | sort -u)"
[ "$(wc -w <<<"$uids")" = 1 ] && [ "$(wc -w <<<"$gids")" = 1 ] || die "values.yaml: one runAsUser and one runAsGroup expected, found '$uids' / '$gids'"
port="$(sed -n 's/^ *containerPort: *\([0-9]*\) *$/\1/p' charts/awx-token-operator/templates/deployment.yaml)"
ctr buildah inspect --type image "$name" |
  python3 -c '
import json, sys
config = json.load(sys.stdin)["OCIv1"]["config"]
version, license, user, port = sys.argv[1:]
want = {
    "User": user,
    "ExposedPorts": {port + "/tcp": {}},
    "Entrypoint": ["/awx-token-operator"],
    "Cmd": ["run"],
}
errors = [f"{k} is {config.get(k)!r}, not {v!r}" for k, v in want.items() if config.get(k) != v]
labels = config.get("Labels") or {}
want_labels = {
    "org.opencontainers.image.title": "awx-token-operator",
    "org.opencontainers.image.version": version,
    "org.opencontainers.image.licenses": license,
}
errors += [f"label {k} is {labels.get(k)!r}, not {v!r}" for k, v in want_labels.items() if labels.get(k) != v]
source = labels.get("org.opencontainers.image.source", "")
if not source.startswith("https://"):
    errors.append(f"label org.opencontainers.image.source is {source!r}")
extra = set(labels) - set(want_labels) - {"org.opencontainers.image.source", "org.opencontainers.image.description"}
if extra:
    errors.append(f"labels the Dockerfile does not set: {sorted(extra)}")
for e in errors:
    print("image config: " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
' "$version" "$license" "$uids:$gids" "$port" || die "the image's config does not match Cargo.toml and the chart"

# It runs as the chart runs it.
said="$(ctr podman run --rm --pull=never --network=none --read-only --read-only-tmpfs=false \
  --cap-drop=ALL --security-opt=no-new-privileges --user "$uids:$gids" "$name" --version)"
[ "$said" = "awx-token-operator $version" ] || die "the image's --version says '$said'"

# ---- 4. the OCI archive ----------------------------------------------------------------------
t0="$(now)"
rm -f "$archive.tmp"
ctr skopeo copy --quiet --dest-compress --dest-compress-format gzip \
  "containers-storage:$name" "oci-archive:$archive.tmp:awx-token-operator:$version"
mv -f "$archive.tmp" "$archive"
t_archive="$(since "$t0")"

bin_size="$(stat -c %s "$out/context/rootfs/awx-token-operator")"
image_size="$(ctr podman image inspect --format '{{.Size}}' "$name")"
digest="$(ctr skopeo inspect --format '{{.Digest}}' "oci-archive:$archive")"
log "binary $(mb "$bin_size") (static); image $(mb "$image_size") unpacked, archive $(mb "$(stat -c %s "$archive")") (gzip layers)"
log "$name $digest, labels, user $uids:$gids and config checked"
log "times: rootfs (cargo) $t_rootfs, buildah $t_bud, archive $t_archive; total $(since "$t_start")"
printf '%s\n' "$archive"
