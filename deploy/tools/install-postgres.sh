#!/bin/sh
# Installs the PostgreSQL server binaries, which `stream-scorer local-postgres` and the tests of
# `sink postgres` run, from Debian's `postgresql` package when none is installed yet (initdb in
# /usr/lib/postgresql/<version>/bin, or on PATH). Run by `make setup` (and so by `make test`).
# Quiet and idempotent. The package's own cluster and service are never started here (a
# policy-rc.d denies service starts during the install, and on systemd hosts the unit is disabled):
# the tools run a private server on a free port, as the package's `postgres` user when root.
set -eu

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL is missing and there is no apt-get: install its server (initdb, postgres, pg_ctl) and set STREAM_SCORER_PG_BIN to their folder" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "PostgreSQL is missing: run 'apt-get install postgresql' as root, or make setup as root" >&2
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
if [ ! -e "$POLICY" ]; then
    # exit status 101: "action not allowed", so invoke-rc.d / deb-systemd-invoke start nothing
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    CREATED=1
fi

echo "installing the PostgreSQL server (Debian package postgresql)"
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
LOG=$(mktemp)
# apt's output is shown only when something fails
if ! { $APT update && $APT install -y --no-install-recommends postgresql; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -f "$LOG"
    exit 1
fi
rm -f "$LOG"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now --quiet postgresql.service >/dev/null 2>&1 || true
fi
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "initdb still missing after installing postgresql" >&2; exit 1; }
