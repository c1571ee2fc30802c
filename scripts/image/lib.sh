# shellcheck shell=sh
# Shell functions the image scripts share (sourced, not run).

# the package version, from pyproject.toml's [project] table
project_version() {
    sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$1/pyproject.toml" | head -n 1
}

# the newest base image `make base-image` built (highest Python version), or nothing
local_base_image() {
    "$1" images --format '{{.Repository}}:{{.Tag}}' "${BASE_IMAGE_NAME:-aleno-bridge-base}" 2>/dev/null \
        | grep -v '<none>' | sort -t: -k2,2 -V | tail -n 1
}

# an image's size in bytes, as the engine reports it (uncompressed)
image_size() {
    "$1" image inspect --format '{{.Size}}' "$2"
}

# bytes as megabytes (10^6), one decimal
mb() {
    awk -v b="$1" 'BEGIN { printf "%.1f", b / 1000000 }'
}

# where the image's source comes from: the git remote `origin` without credentials (a local
# path as a file:// URL), else the checkout itself
source_url() {
    url=$(git -C "$1" remote get-url origin 2>/dev/null || echo "$1")
    case $url in
        /*) url="file://$url" ;;
    esac
    printf '%s\n' "$url" | sed 's#://[^/@]*@#://#'
}
