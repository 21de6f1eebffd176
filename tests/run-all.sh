#!/usr/bin/env bash
# Every test of the project, as CI runs it: formatting, lints, generated files, unit tests, the
# AWX stand-in's own tests, the container image (built from the Dockerfile without a registry),
# and the end-to-end suite against a real kube-apiserver and AWX stand-in, the image included.
# The first run on a machine builds kube-apiserver from Debian's source (about 6 minutes, cached
# under ~/.cache/awx-token-operator) and the static release binary of the image (7 to 10
# minutes, cached in cargo's target dir); later runs take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
step "generated files"
tests/check-generated.sh
step "unit tests"
cargo test --lib --bins
step "AWX stand-in self-test"
tests/awx-standin/standin.sh test -q
step "awx-token-operator login against the stand-ins (the browser played by reqwest)"
cargo test --test login_standin
step "image: the Dockerfile built without a registry (image/build.sh), run by the end-to-end suite"
AWXTO_IMAGE_ARCHIVE="$(image/build.sh | tail -n 1)"
export AWXTO_IMAGE_ARCHIVE AWXTO_REQUIRE_IMAGE=1
step "end-to-end suite (kube-apiserver + controller-manager + AWX stand-ins on loopback; the image under podman)"
tests/env/with-env.sh cargo test --test e2e
