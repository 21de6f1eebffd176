#!/usr/bin/env bash
# Build kube-apiserver + kube-controller-manager v1.20.2 from Debian bookworm's "kubernetes" source package
# (1.20.5+really1.20.2-1.1+deb12u1) with Debian's Go 1.19. Only the machine's Debian mirror is used
# (apt-get); no Go module proxy, no GitHub, no dl.k8s.io.
#   usage: build-kube-cp.sh OUT_DIR
# Normally run by kube-bin.sh, which builds into a temp dir and moves it into the cache. Needs root
# (apt-get install golang-go rsync dpkg-dev make), about 6 min on 2 cores and 2.2 GB in WORK.
# Env: WORK    build dir (default: new mktemp dir; must not contain an old k8s/ tree)
#      GOCACHE persistent Go build cache; k8s' make ignores $GOCACHE and uses
#              WORK/k8s/_output/local/go/cache, so that path is made a symlink to $GOCACHE.
#              Cache hits need the SAME absolute WORK path as the build that filled it.
#      WHAT    make targets (default "cmd/kube-apiserver cmd/kube-controller-manager")
# Result: OUT_DIR/kube-apiserver, OUT_DIR/kube-controller-manager, OUT_DIR/etcd (Debian etcd-server 3.4.23)
set -euo pipefail
OUT="${1:?usage: $0 OUT_DIR}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"; cd "$WORK"
WHAT="${WHAT:-cmd/kube-apiserver cmd/kube-controller-manager}"

# 1. toolchain from Debian (golang-go = Go 1.19.8 in bookworm; rsync is needed by k8s' make)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq golang-go rsync dpkg-dev make >/dev/null

# 2. private deb-src list (system apt config is not modified)
mkdir -p apt/lists/partial apt/sources.list.d
: > apt/sources.list
[ -f /etc/apt/sources.list ] && sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > apt/sources.list
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] && sed 's/^Types: deb$/Types: deb-src/' "$f" > "apt/sources.list.d/${f##*/}"
done
APTO=(-o Dir::Etc::SourceList="$WORK/apt/sources.list" -o Dir::Etc::SourceParts="$WORK/apt/sources.list.d"
      -o Dir::State::Lists="$WORK/apt/lists")
apt-get "${APTO[@]}" update -qq
apt-get "${APTO[@]}" source --download-only kubernetes=1.20.5+really1.20.2-1.1+deb12u1 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
dpkg-source -x kubernetes_1.20.5+really1.20.2-1.1+deb12u1.dsc k8s >/dev/null   # applies Debian's CVE patches

# 3. Go >= 1.18 fix: vendored modern-go/reflect2 v1.0.1 crashes ("fatal error: fault" in
#    mapiterinit) when built with Go 1.18+. Replace it with Debian's reflect2 1.0.2.
apt-get download golang-github-modern-go-reflect2-dev=1.0.2-2 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
dpkg-deb -x golang-github-modern-go-reflect2-dev_1.0.2-2_all.deb reflect2
rm -rf k8s/vendor/github.com/modern-go/reflect2
mkdir -p k8s/vendor/github.com/modern-go/reflect2
cp reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
   reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
   k8s/vendor/github.com/modern-go/reflect2/
rm -f k8s/vendor/github.com/modern-go/reflect2/*_test.go

# 4. build with the upstream Makefile in GOPATH mode (as k8s 1.20 itself did), offline
cd k8s
if [ -n "${GOCACHE:-}" ]; then   # hack/lib/golang.sh forces GOCACHE=_output/local/go/cache
  mkdir -p "$GOCACHE" _output/local/go && ln -sfn "$GOCACHE" _output/local/go/cache
fi
env -u GOROOT -u GOCACHE GOPROXY=off GOFLAGS= GO111MODULE=off CGO_ENABLED=0 \
    HOME="$WORK/home" \
    KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean \
    KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56 \
    make WHAT="$WHAT" GOLDFLAGS="-s -w"
for w in $WHAT; do cp "_output/local/bin/linux/amd64/${w##*/}" "$OUT/"; done
cd "$WORK"

# 5. etcd 3.4.23 from Debian's etcd-server .deb (extracted, not installed: no service starts)
apt-get download etcd-server=3.4.23-4+b4 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
dpkg-deb -x etcd-server_3.4.23-4+b4_amd64.deb etcd-deb
cp etcd-deb/usr/bin/etcd "$OUT/etcd"

for w in $WHAT; do "$OUT/${w##*/}" --version; done
"$OUT/etcd" --version | sed -n 1p   # (| head -1 could SIGPIPE etcd -> exit 141 under pipefail)
echo "built into $OUT (work dir $WORK)"
