#!/usr/bin/env bash
# The whole test suite, as root on Debian: installs what is needed, type-checks,
# then runs every test (unit, real node processes, real FUSE mounts).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/tools/install.sh" --test
cd "$here"
echo "objfs: type check (mypy)"
.venv/bin/python -m mypy fusefront storagenode tools
echo "objfs: tests"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
