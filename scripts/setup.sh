#!/usr/bin/env bash
# Create ./.venv with everything the pipeline and its tests need (idempotent: a stamp of the
# dependency files skips the work when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.pippo-setup-$(cat pyproject.toml requirements.lock scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip wheel setuptools
# CPU torch first and pinned: an unpinned `torch` would pull a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
# DeepSpeed compiles its ops on first use (JIT) instead of at install; the lock pins everything
# else so a fresh machine resolves nothing and installs the versions CI tested.
DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -c requirements.lock -e '.[test]'
rm -f "$VENV"/.pippo-setup-*
touch "$stamp"
echo "setup: $VENV ready" >&2
