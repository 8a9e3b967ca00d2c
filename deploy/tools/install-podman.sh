#!/bin/sh
# Installs podman, runc and mmdebstrap, which the image test (tests/integration/test_image.py)
# needs to build deploy/Dockerfile and run it, from Debian's packages when any is missing. Run by
# `make tools` (and so by `make test`). Quiet and idempotent: does nothing when all three are on
# PATH. runc, not podman's default crun: crun refuses hosts with hybrid cgroups.
set -eu

missing=""
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -z "$missing" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing:$missing and there is no apt-get: install podman, runc and mmdebstrap" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "missing:$missing: run 'apt-get install podman runc mmdebstrap' as root, or make tools as root" >&2
        exit 1
    fi
fi

echo "installing$missing (Debian packages podman runc mmdebstrap)"
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
LOG=$(mktemp)
# apt's output is shown only when something fails
if ! { $APT update && $APT install -y --no-install-recommends podman runc mmdebstrap; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -f "$LOG"
    exit 1
fi
rm -f "$LOG"
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool still missing after the install" >&2; exit 1; }
done
