#!/bin/sh
# Installs promtool, which the tests of deploy/prometheus need, from Debian's `prometheus` package
# when it is not on PATH yet. Run by `make setup` (and so by `make test`). Quiet and idempotent.
# The package also ships a Prometheus server with a service: it is never started (apt-install.sh
# --no-service). Without apt-get: put Prometheus' promtool (2.42 or newer) on PATH.
set -eu

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
sh "$(dirname "$0")/apt-install.sh" --no-service prometheus.service promtool prometheus
command -v promtool >/dev/null 2>&1 || { echo "promtool still missing after installing prometheus" >&2; exit 1; }
