# Shared helpers for scripts/ and bench/: sourced, never executed.
# shellcheck shell=bash

log() { printf '%s: %s\n' "${LOG_PREFIX:-${0##*/}}" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "${LOG_PREFIX:-${0##*/}}" "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo; a machine with
# neither cannot install system packages, and saying so beats a confusing apt error.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "sudo refused to run '$*' (needs passwordless sudo, or run as root)"
    else
        die "need root to run '$*' and sudo is not installed"
    fi
}

deb_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

_APT_UPDATED=0
# Install Debian packages that are not installed yet. `apt-get update` runs only when
# something is missing, so a machine that has everything pays nothing.
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        deb_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$_APT_UPDATED" -eq 0 ]; then
        log "apt-get update (missing: ${missing[*]})"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=180 update >/dev/null \
            || die "apt-get update failed"
        _APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=180 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        install --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

# Create $VENV (Python >= 3.11 from $PYTHON) unless a usable one is there. Debian's python3
# ships venv without ensurepip until python3-venv is installed, so that is installed first.
ensure_venv() {
    if "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' >/dev/null 2>&1; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (need Python 3.11+)"
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' \
        || die "$PYTHON is $("$PYTHON" --version 2>&1); mailgate needs 3.11+ (set PYTHON=...)"
    rm -rf "$VENV"
    log "creating .venv with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        "$PYTHON" -m venv "$VENV" || die "cannot create .venv"
    fi
}
