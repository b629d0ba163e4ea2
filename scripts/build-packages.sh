#!/usr/bin/env bash
# Build the Debian package (and, with --rpm or by default when rpmbuild can be had, the RPM)
# from this checkout into dist/, then check them: lintian for the .deb, rpmlint for the .rpm.
#
#   scripts/build-packages.sh            # .deb + .rpm, lintian + rpmlint
#   scripts/build-packages.sh --deb      # the .deb only
#   scripts/build-packages.sh --rpm      # the .rpm only
#
# Runs as root on Debian 12 (it installs the build tools it needs with apt-get). The source
# is the working tree as it is (uncommitted changes included), copied without .git, .venv,
# build/ and dist/. Details: docs/packaging.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIST=${CUJU_DIST:-$ROOT/dist}   # CUJU_DIST: where the tests want them
# Debian tools and the system Python only (not a pyenv or virtualenv on PATH).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
log() { printf '[build-packages] %s\n' "$*" >&2; }

want_deb=1 want_rpm=1
case "${1:-}" in
    --deb) want_rpm=0 ;;
    --rpm) want_deb=0 ;;
    "") ;;
    *) echo "usage: $0 [--deb|--rpm]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "build-packages.sh: must run as root (it installs the build tools with apt-get)" >&2
    exit 2
fi

# Build tools and the Build-Depends of packaging/debian/control.
TOOLS=(dpkg-dev debhelper dh-python lintian nbdkit-plugin-dev pkg-config python3-all-dev python3-setuptools
       python3-libvirt python3-lxml python3-yaml python3-prometheus-client python3-tenacity
       rpm rpmlint)
missing=()
for p in "${TOOLS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing build tools: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' cuju_libvirt/__init__.py)
WORK=$(mktemp -d /tmp/cuju-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/cuju-libvirt-$VERSION
mkdir -p "$SRC" "$DIST"
# The source tree, without what is local to this checkout.
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.so' --exclude=./cuju_libvirt/libexec --exclude=.mypy_cache \
    --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C "$SRC" -xf -
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}

if [ $want_deb = 1 ]; then
    log "building the Debian package (dpkg-buildpackage, pybuild)"
    cp -a packaging/debian "$SRC/debian"
    start=$(date +%s)
    (cd "$SRC" && dpkg-buildpackage -us -uc -b) > "$WORK/deb.log" 2>&1 || {
        tail -40 "$WORK/deb.log" >&2; echo "build-packages.sh: dpkg-buildpackage failed" >&2; exit 1; }
    rm -f "$DIST"/cuju-libvirt_*.deb
    cp "$WORK"/cuju-libvirt_"$VERSION"_*.deb "$DIST"/
    deb=$(ls "$DIST"/cuju-libvirt_"$VERSION"_*.deb)
    log "built $deb in $(( $(date +%s) - start )) s"
    log "lintian $deb"
    # lintian exits non-zero on errors only (--fail-on error): warnings are listed and
    # explained in docs/packaging.md.
    lintian --fail-on error --info --display-info "$deb" | tee "$DIST/lintian.txt" >&2
fi

if [ $want_rpm = 1 ]; then
    log "building the RPM (rpmbuild, packaging/rpm/cuju-libvirt.spec)"
    start=$(date +%s)
    TOP=$WORK/rpmbuild
    mkdir -p "$TOP"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
    rm -rf "$SRC/debian"
    tar -C "$WORK" -czf "$TOP/SOURCES/cuju-libvirt-$VERSION.tar.gz" "cuju-libvirt-$VERSION"
    # --nodeps: the BuildRequires name RHEL packages, not Debian's (rpm has no database here).
    rpmbuild --define "_topdir $TOP" --nodeps -bb packaging/rpm/cuju-libvirt.spec > "$WORK/rpm.log" 2>&1 || {
        tail -40 "$WORK/rpm.log" >&2; echo "build-packages.sh: rpmbuild failed" >&2; exit 1; }
    rm -f "$DIST"/cuju-libvirt-*.rpm
    cp "$TOP"/RPMS/*/cuju-libvirt-"$VERSION"-*.rpm "$DIST"/
    rpm_file=$(ls "$DIST"/cuju-libvirt-"$VERSION"-*.rpm)
    log "built $rpm_file in $(( $(date +%s) - start )) s"
    log "rpmlint $rpm_file"
    rpmlint -c packaging/rpm/rpmlint.toml -r packaging/rpm/cuju-libvirt.rpmlintrc "$rpm_file" | tee "$DIST/rpmlint.txt" >&2
fi
log "done: $(cd "$DIST" && ls)"
