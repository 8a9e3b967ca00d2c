#!/bin/sh
# Installs the PostgreSQL server binaries, which `stream-scorer local-postgres` and the tests of
# `sink postgres` run, from Debian's `postgresql` package when none is installed yet (initdb in
# /usr/lib/postgresql/<version>/bin, or on PATH). Run by `make setup` (and so by `make test`).
# Quiet and idempotent. The package's own cluster and service are never started (apt-install.sh
# --no-service): the tools run a private server on a free port, as the package's `postgres` user
# when root. Without apt-get: install the server and set STREAM_SCORER_PG_BIN to its bin folder.
set -eu

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    exit 0
fi
sh "$(dirname "$0")/apt-install.sh" --no-service postgresql.service "the PostgreSQL server" postgresql
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "initdb still missing after installing postgresql" >&2; exit 1; }
