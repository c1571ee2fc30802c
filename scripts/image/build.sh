#!/bin/sh
# Build the aleno-bridge image from the checkout: tag <IMAGE_NAME>:<package version>, the OCI
# labels (version, revision, source, base), then print the image size, what it adds to the
# base image and the build time.
#
# Environment (all optional):
#   CONTAINER_ENGINE   docker or podman (default: docker if its daemon answers, else podman)
#   PYTHON_IMAGE       the base image; default: the newest aleno-bridge-base:<python> that
#                      `make base-image` built, if any, else docker.io/library/python:3.12-slim
#   IMAGE_NAME         default aleno-bridge (the Helm chart's default image.repository)
#   IMAGE_SOURCE       the source label; default: the git remote `origin` (without any
#                      user:password@), else the checkout as a file:// URL
#   PIP_CERT           a CA bundle file for pip in the build (a TLS-inspecting proxy); given
#                      to the build as a secret, in no layer
#   PIP_INDEX_URL      a package index mirror for the build
#   IMAGE_BUILD_ARGS   more arguments for `<engine> build` (e.g. --network host)
# Prints the image reference on the last line of its output.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
engine=$("$here/engine.sh")
# shellcheck source=scripts/image/lib.sh
. "$here/lib.sh"

version=$(project_version "$root")
name=${IMAGE_NAME:-aleno-bridge}
ref="$name:$version"

if [ -n "${PYTHON_IMAGE:-}" ]; then
    base=$PYTHON_IMAGE
    why="PYTHON_IMAGE"
else
    base=$(local_base_image "$engine")
    why="built by make base-image; set PYTHON_IMAGE to choose another"
    if [ -z "$base" ]; then
        base=docker.io/library/python:3.12-slim
        why="the default; without a registry run make base-image first"
    fi
fi

revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    revision="$revision-dirty"
fi
source=${IMAGE_SOURCE:-$(source_url "$root")}

set -- --tag "$ref" \
    --build-arg "PYTHON_IMAGE=$base" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "SOURCE=$source"
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    set -- "$@" --secret "id=pip_cert,src=$PIP_CERT"
fi
if [ -n "${PIP_INDEX_URL:-}" ]; then
    set -- "$@" --build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"
fi

echo "image: building $ref with $engine on $base ($why)"
start=$(date +%s)
# IMAGE_BUILD_ARGS is split into words on purpose
# shellcheck disable=SC2086
if ! "$engine" build "$@" ${IMAGE_BUILD_ARGS:-} "$root"; then
    echo "image: the build failed. Without access to a registry, build a base image from" \
         "Debian packages first (make base-image) or set PYTHON_IMAGE to one your mirror has;" \
         "behind a TLS-inspecting proxy set PIP_CERT to its CA bundle (docs/image.md)." >&2
    exit 1
fi
seconds=$(( $(date +%s) - start ))

size=$(image_size "$engine" "$ref")
base_size=$(image_size "$engine" "$base")
echo "image: $ref built in ${seconds}s"
echo "image: size $(mb "$size") MB, base $base $(mb "$base_size") MB," \
     "added by aleno-bridge $(mb $(( size - base_size ))) MB"
echo "$ref"
