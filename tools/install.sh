#!/usr/bin/env bash
# Installs everything objfs needs on Debian, as root: system packages, a
# virtualenv holding the project, and the programs on PATH (mount.fuse3 runs
# `objfs` through /bin/sh, so it must be on PATH).
# Usage: tools/install.sh [--test]   (--test adds the test tools)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${OBJFS_VENV:-$here/.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

packages=(fuse3 libfuse3-dev pkg-config python3 python3-venv python3-dev gcc attr git
          procps psmisc util-linux iproute2 systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "objfs: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "objfs: creating virtualenv $venv"
  python3 -m venv "$venv"
fi
echo "objfs: installing the project into $venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extras"
for prog in objfs objfs-node objfs-admin; do
  ln -sf "$venv/bin/$prog" "/usr/local/bin/$prog"
done
# `mount -t fuse.objfs` looks for the helper as /sbin/mount.fuse.objfs first,
# then falls back to mount.fuse3, which runs `objfs` from PATH.
grep -q '^user_allow_other' /etc/fuse.conf 2>/dev/null || echo user_allow_other >> /etc/fuse.conf
