#!/usr/bin/env bash
# Install qimg with its test dependencies, make sure the oracle (qemu-img,
# qemu-io from Debian's qemu-utils) is present, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-utils >/dev/null
fi
if ! command -v mkfs.xfs >/dev/null || ! command -v mkfs.btrfs >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq xfsprogs btrfs-progs >/dev/null
fi
python3 -m ruff check qimg tests bench
python3 -m pytest -n 2 -q "$@"
