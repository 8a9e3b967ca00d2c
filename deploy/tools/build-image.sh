#!/bin/sh
# Builds deploy/Dockerfile with podman on a Debian base image made by mmdebstrap, for the image
# test (tests/integration/test_image.py); prints the image's name on its last line. Needs root,
# podman, runc and mmdebstrap (deploy/tools/install-podman.sh). Run from the repository root.
#
# No registry is needed: the base (Debian bookworm's python3.11, `python` linked to it) is made
# once by mmdebstrap and kept in podman's storage (localhost/stream-scorer-base:py311-bookworm);
# the image is tagged by a hash of the Dockerfile, the base and every file of its build context,
# so an unchanged tree reuses the image built before. The stock python image stays the
# Dockerfile's default (PYTHON_IMAGE) for real builds.
#
# This network inspects TLS: the host's trust store and pip configuration are mounted into the
# build's RUN steps, with the host's network. Environment: STREAM_SCORER_CACHE (default
# ~/.cache/stream-scorer) holds containers.conf and the base's rootfs while it is made.
set -eu

CACHE=${STREAM_SCORER_CACHE:-$HOME/.cache/stream-scorer}
BASE=localhost/stream-scorer-base:py311-bookworm
NAME=localhost/stream-scorer
mkdir -p "$CACHE/podman"

# podman's defaults fail here: crun refuses hybrid cgroups (so runc), the default nproc/nofile
# ulimits are refused (setrlimit: Operation not permitted), systemd is not the cgroup manager
CONF="$CACHE/podman/containers.conf"
cat >"$CONF.new" <<'CONF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONF
mv "$CONF.new" "$CONF"
export CONTAINERS_CONF="$CONF"

for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing: run make tools" >&2; exit 1; }
done

MOUNTS=""
[ -f /etc/ssl/certs/ca-certificates.crt ] && MOUNTS="$MOUNTS -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"
[ -f /etc/pip.conf ] && MOUNTS="$MOUNTS -v /etc/pip.conf:/etc/pip.conf:ro"

if ! podman image exists "$BASE"; then
    echo "making the base image $BASE with mmdebstrap" >&2
    work=$(mktemp -d "$CACHE/podman/base.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    mmdebstrap --quiet --variant=minbase \
        --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
        bookworm "$work/rootfs.tar" >&2
    podman import --quiet "$work/rootfs.tar" "$BASE-rootfs" >/dev/null
    # Debian has no `python`; the Dockerfile calls python
    printf 'FROM %s\nRUN ln -s /usr/bin/python3.11 /usr/local/bin/python\nCMD ["python3"]\n' \
        "$BASE-rootfs" >"$work/Containerfile"
    podman build --quiet --network host -t "$BASE" -f "$work/Containerfile" "$work" >/dev/null
    podman rmi "$BASE-rootfs" >/dev/null
    rm -rf "$work"
    trap - EXIT
fi

# the build context, as deploy/Dockerfile.dockerignore lets it through, and the base's id
hash=$( {
    podman image inspect --format '{{.Id}}' "$BASE"
    find deploy/Dockerfile deploy/requirements.lock pyproject.toml README.md stream_scorer \
        schemas deploy/config -name __pycache__ -prune -o -type f -print | LC_ALL=C sort |
        xargs sha256sum
} | sha256sum | cut -c1-16)
IMAGE="$NAME:$hash"
if ! podman image exists "$IMAGE"; then
    echo "building $IMAGE from deploy/Dockerfile" >&2
    # shellcheck disable=SC2086  # MOUNTS is a list of options
    podman build --network host $MOUNTS --build-arg PYTHON_IMAGE="$BASE" \
        -f deploy/Dockerfile -t "$IMAGE" . >&2
    # the images of earlier trees, and the build stages left untagged: ~0.8 GB each
    podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$NAME" |
        grep -vx "$IMAGE" | xargs -r podman rmi >/dev/null 2>&1 || true
    podman image prune --force >/dev/null 2>&1 || true
fi
echo "$IMAGE"
