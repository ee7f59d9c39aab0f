#!/usr/bin/env bash
# Quick start, as root on Debian: install what is needed, start a metadata
# node and 3 data nodes on loopback (state under /var/lib/objfs-local), create
# the volume "demo" and mount it on /mnt/objfs.  Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/tools/install.sh"
exec "$here/.venv/bin/objfs-admin" local up "$@"
