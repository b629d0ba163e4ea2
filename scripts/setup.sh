#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for the cuju-libvirt demo and tests:
# Debian packages, a virtualenv in .venv with the package installed (C extension
# built), and nothing else. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: must run as root (it installs Debian packages and runs libvirtd)" >&2
    exit 2
fi

mapfile -t PKGS < <(grep -v '^\s*#' scripts/debian-packages.txt | grep -v '^\s*$')
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps package scripts from starting the system libvirtd: the rig runs its own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating virtualenv .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.cuju-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ -n "$(find c_ext -newer "$stamp" -print -quit)" ]; then
    log "installing cuju-libvirt and test dependencies into .venv (builds the C extension)"
    .venv/bin/pip install -q --upgrade pip setuptools wheel
    .venv/bin/pip install -q -e ".[test]"
    touch "$stamp"
fi
# The block server's nbdkit plugin (c_ext/nbdkit): loaded by nbdkit, not by Python.
plugin=cuju_libvirt/libexec/nbdkit-cujudisk-plugin.so
if [ ! -f "$plugin" ] || [ -n "$(find c_ext/nbdkit c_ext/diskjournal.c c_ext/diskjournal.h c_ext/wire.h -newer "$plugin" -print -quit)" ]; then
    log "building the nbdkit plugin $plugin"
    make -s -C c_ext/nbdkit
fi
log "ready: $ROOT/.venv"
