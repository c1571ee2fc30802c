#!/bin/sh
# Print the container engine to use: $CONTAINER_ENGINE if set, else docker when its daemon
# answers, else podman when installed.
set -eu
if [ -n "${CONTAINER_ENGINE:-}" ]; then
    echo "$CONTAINER_ENGINE"
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
elif command -v podman >/dev/null 2>&1; then
    echo podman
else
    echo "no container engine: install Docker or Podman, or set CONTAINER_ENGINE" >&2
    exit 1
fi
