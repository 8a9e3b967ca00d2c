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
sh "$(dirname "$0")/apt-install.sh" "${missing# }" podman runc mmdebstrap
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool still missing after the install" >&2; exit 1; }
done
