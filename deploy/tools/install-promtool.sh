#!/bin/sh
# Installs promtool, which the tests of deploy/prometheus need, from Debian's `prometheus` package
# when it is not on PATH yet. Run by `make setup` (and so by `make test`). Quiet and idempotent.
# The package also ships a Prometheus server with a service: it is never started here (a
# policy-rc.d denies service starts during the install, and on systemd hosts the unit is disabled).
set -eu

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "promtool is missing and there is no apt-get: put Prometheus' promtool (2.42 or newer) on PATH" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "promtool is missing: run 'apt-get install prometheus' as root, or make setup as root" >&2
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

echo "installing promtool (Debian package prometheus)"
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
LOG=$(mktemp)
# apt's output is shown only when something fails
if ! { $APT update && $APT install -y --no-install-recommends prometheus; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -f "$LOG"
    exit 1
fi
rm -f "$LOG"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now --quiet prometheus.service >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null 2>&1 || { echo "promtool still missing after installing prometheus" >&2; exit 1; }
