#!/bin/sh
# Installs an MLflow tracking server for the model-registry tests into a virtualenv of its own,
# outside the repository and apart from the project's (mlflow is no dependency of stream-scorer:
# the worker reads the registry over REST). Run by `make mlflow-tools` (part of `make test`).
# Quiet and idempotent: does nothing when the pinned version is there already.
set -eu

VERSION="3.17.2"
EXTRAS="auth"  # the basic-auth app (Flask-WTF), for the basic-auth test
CACHE="${STREAM_SCORER_CACHE:-$HOME/.cache/stream-scorer}"
VENV="$CACHE/mlflow-tools"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/mlflow" ] && [ "$(cat "$VENV/.version" 2>/dev/null)" = "$VERSION[$EXTRAS]" ]; then
    exit 0
fi
mkdir -p "$CACHE"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "mlflow[$EXTRAS]==$VERSION"
echo "$VERSION[$EXTRAS]" > "$VENV/.version"
