#!/usr/bin/env bash
# Build the image tests/container.rs runs (localhost/tfmirror:test) with deploy/Dockerfile,
# around the release binary, stripped into target/image/tfmirror.
#
# No image registry is reachable here, so the base image is made locally: mmdebstrap
# extracts glibc, libgcc, coreutils (`id` for the test), dash (the Dockerfile's layout step)
# and the CA roots from the Debian mirror apt uses, for the host's own release (the binary's
# glibc). It is kept in podman's store, so later runs reuse it.
#
# Without root or podman this prints SKIP and succeeds (tests/container.rs then skips as
# well); under CI=true that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${TFM_IMAGE:-localhost/tfmirror:test}

skip() {
  if [ "${CI:-}" = true ]; then
    echo "container image: $1 (CI=true: the container tests must run)" >&2
    exit 1
  fi
  echo "SKIP: container image: $1"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "not root (the container tests use rootful podman)"
command -v podman >/dev/null || skip "podman is not installed (make container-deps)"

cargo build --release --locked --bin tfmirror
# Into the build context (.dockerignore lets this one file in), wherever cargo builds.
mkdir -p target/image
strip -o target/image/tfmirror "${CARGO_TARGET_DIR:-target}/release/tfmirror"

export CONTAINERS_CONF=$PWD/tests/container/containers.conf
export CONTAINERS_CONF_OVERRIDE=$CONTAINERS_CONF

. /etc/os-release
base=localhost/tfmirror-base:${VERSION_CODENAME:?the host release has no codename}
if ! podman image exists "$base"; then
  echo "making the base image $base with mmdebstrap"
  sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  mmdebstrap --quiet --mode=root --variant=extract \
    --include=libc6,libgcc-s1,coreutils,dash,ca-certificates \
    --extract-hook='ln -sf dash "$1/bin/sh"' \
    --extract-hook='mkdir -p "$1/etc/ssl/certs" && cat "$1"/usr/share/ca-certificates/*/*.crt > "$1/etc/ssl/certs/ca-certificates.crt"' \
    --extract-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/info "$1"/usr/share/locale' \
    "$VERSION_CODENAME" - "$sources" | podman import --quiet - "$base" >/dev/null
fi

# The untagged images this build leaves (its stages, the image it replaces) are removed after
# it; others' are left alone.
dangling() { podman images --quiet --no-trunc --filter dangling=true | sort; }
before=$(dangling)
# Docker's format: OCI's has no HEALTHCHECK.
podman build --quiet --runtime runc --network host --format docker \
  --build-arg RUST_IMAGE="$base" --build-arg BASE_IMAGE="$base" \
  --build-arg TFMIRROR_BIN=target/image/tfmirror \
  -f deploy/Dockerfile -t "$image" . >/dev/null
left=$(comm -13 <(echo "$before") <(dangling))
[ -z "$left" ] || podman rmi $left >/dev/null 2>&1 || true
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "built $image: $((size / 1000000)) MB (base $base: $(( $(podman image inspect --format '{{.Size}}' "$base") / 1000000 )) MB)"
