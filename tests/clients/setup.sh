#!/usr/bin/env bash
# Creates (or reuses) a virtualenv with the official openai and anthropic Python SDKs for sdk_check.py,
# then prints the venv's python path. Usage: tests/clients/setup.sh [VENV_DIR]   (default /tmp/tollgate-sdk-venv)
#
#   TOLLGATE_SDK_PYTHON=$(tests/clients/setup.sh | tail -n1) \
#       cargo test -p tollgate-tests --test sdk_clients -- --ignored
set -euo pipefail

venv="${1:-/tmp/tollgate-sdk-venv}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
py="$venv/bin/python"

# Skip the installer when every requirement is already satisfied (idempotent, works offline once set up).
if ! "$py" - "$req" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    r = Requirement(line)
    try:
        if not r.specifier.contains(version(r.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
    "$py" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
fi

echo "$py"
