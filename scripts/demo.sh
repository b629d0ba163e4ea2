#!/usr/bin/env bash
# The demo: set up this machine (Debian packages, .venv, C extension), then build the test
# guest, bring up two local libvirt hosts, define and start a protected VM on host a with
# virsh, show its <cuju:ft> settings and its counter, and tear everything down.
# Extra arguments go to 'python -m cuju_libvirt.rig demo' (e.g. --keep). Must run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m cuju_libvirt.rig demo "$@"
