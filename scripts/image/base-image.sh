#!/bin/sh
# Build a Python base image from Debian packages only (no container registry needed):
# mmdebstrap makes a minimal Debian root filesystem with python3 and python3-venv, and the
# container engine imports it as `aleno-bridge-base:<python major.minor>`.
#
# Environment (all optional):
#   CONTAINER_ENGINE        docker or podman (default: docker if its daemon answers, else podman)
#   DEBIAN_SUITE            the Debian release (default: bookworm)
#   DEBIAN_MIRROR           the package mirror (default: http://deb.debian.org/debian)
#   DEBIAN_SECURITY_MIRROR  the security mirror; empty: none (default: http://deb.debian.org/debian-security)
#   BASE_IMAGE_NAME         the image name (default: aleno-bridge-base)
# Prints the image reference on the last line of its output.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
engine=$("$here/engine.sh")
# shellcheck source=scripts/image/lib.sh
. "$here/lib.sh"
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR-http://deb.debian.org/debian-security}
name=${BASE_IMAGE_NAME:-aleno-bridge-base}

command -v mmdebstrap >/dev/null 2>&1 || {
    echo "base-image: mmdebstrap not found; install it (Debian/Ubuntu: apt-get install mmdebstrap)" >&2
    exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/aleno-bridge-base.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# one sources.list line per repository: the release, its updates and its security fixes
set -- "deb $mirror $suite main" "deb $mirror $suite-updates main"
if [ -n "$security" ]; then
    set -- "$@" "deb $security $suite-security main"
fi

start=$(date +%s)
# minbase: only the packages Debian marks required, plus Python and CA certificates (TLS to
# the upstream and the buses). No documentation, manual pages or translations. The hook
# records the Python version for the tag ("$1": the new root, expanded by mmdebstrap).
# shellcheck disable=SC2016
mmdebstrap --variant=minbase --format=tar --quiet \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='chroot "$1" python3 -c "import sys; print(\"%d.%d\" % sys.version_info[:2])" > "'"$work"'/python-version"' \
    "$suite" "$work/rootfs.tar" "$@" </dev/null

version=$(cat "$work/python-version")
ref="$name:$version"
"$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "Python $version from Debian $suite packages (mmdebstrap minbase)" \
    "$work/rootfs.tar" "$ref" >/dev/null
echo "base-image: built $ref with $engine from Debian $suite in $(( $(date +%s) - start ))s," \
     "$(mb "$(image_size "$engine" "$ref")") MB"
echo "$ref"
