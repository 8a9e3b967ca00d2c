#!/bin/sh
# Installs Debian packages for the set-up scripts beside it (install-postgres.sh,
# install-promtool.sh, install-podman.sh), each of which first checks whether what it needs is
# already there. Usage: apt-install.sh [--no-service UNIT] WHAT PACKAGE... (WHAT names the
# missing tools in the messages). Quiet: apt's output is shown only when something fails.
# --no-service: the package ships a service that must never start here (a policy-rc.d denies
# service starts during the install, and on systemd hosts UNIT is disabled after it).
set -eu

SERVICE=""
if [ "${1:-}" = "--no-service" ]; then
    SERVICE=$2
    shift 2
fi
WHAT=$1
shift

if ! command -v apt-get >/dev/null 2>&1; then
    echo "$WHAT missing and there is no apt-get: install $* (or their equivalent) yourself" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "$WHAT missing: run 'apt-get install $*' as root, or make setup as root" >&2
        exit 1
    fi
fi

POLICY=/usr/sbin/policy-rc.d
CREATED=""
cleanup() {
    if [ -n "$CREATED" ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [ -n "$SERVICE" ] && [ ! -e "$POLICY" ]; then
    # exit status 101: "action not allowed", so invoke-rc.d / deb-systemd-invoke start nothing
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    CREATED=1
fi

echo "installing $WHAT (Debian packages $*)"
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
LOG=$(mktemp)
if ! { $APT update && $APT install -y --no-install-recommends "$@"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -f "$LOG"
    exit 1
fi
rm -f "$LOG"
if [ -n "$SERVICE" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now --quiet "$SERVICE" >/dev/null 2>&1 || true
fi
