#!/usr/bin/env bash
# Install everything the benchmark compares against, into bench/.work/ (gitignored):
#   bench/.work/venv        Python venv: aiosmtpd (PyPI) + this checkout of mailgate (editable)
#   bench/.work/node        smtp-server (npm), pinned by bench/node/package-lock.json
#   bench/.work/postfix     postfix's smtp-source and smtp-sink, extracted from the Debian
#                           package with `dpkg -x`: nothing is installed or started system-wide
#   bench/.work/bin         smtp-source / smtp-sink wrappers that find postfix's shared libs
# Idempotent; rerun after changing the pins. Needs network access to PyPI, npm and Debian.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH")"
WORK="$BENCH/.work"
LOG_PREFIX=bench/setup
# shellcheck source=scripts/_common.sh
. "$ROOT/scripts/_common.sh"

AIOSMTPD_VERSION=1.4.6
PYTHON="${PYTHON:-python3}"

mkdir -p "$WORK/bin"

setup_python() {
    local venv="$WORK/venv"
    if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "creating $venv"
        "$PYTHON" -m venv "$venv" || die "python venv failed (Debian: apt-get install python3-venv)"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "aiosmtpd==$AIOSMTPD_VERSION" \
        "dnslib>=0.9.24" \
        || die "pip install aiosmtpd failed"
    # mailgate as users install it (with the "fast" extra: uvloop). run.py also runs it as
    # "mailgate-asyncio" on the stock loop that aiosmtpd uses, to compare the engines alone.
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[fast]"; then
        log "WARNING: mailgate did not install into the bench venv; run.py will report it as not runnable"
    fi
}

setup_node() {
    command -v node >/dev/null 2>&1 || apt_install nodejs
    command -v npm >/dev/null 2>&1 || apt_install npm
    local dir="$WORK/node" want
    mkdir -p "$dir"
    cp "$BENCH/node/package.json" "$BENCH/node/package-lock.json" "$dir/"
    want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    if [ "$(cat "$dir/node_modules/.bench-lock.sha256" 2>/dev/null)" != "$want" ]; then
        log "npm ci (smtp-server)"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm ci failed"
        echo "$want" >"$dir/node_modules/.bench-lock.sha256"
    fi
    (cd "$dir" && node -e 'require("smtp-server")') || die "smtp-server does not load"
}

download_postfix_deb() {
    local dest="$1"
    # `apt-get download` needs no root, only current package lists.
    if ! (cd "$dest" && apt-get download postfix >/dev/null 2>&1); then
        log "apt-get update (to download postfix)"
        as_root apt-get -q -o DPkg::Lock::Timeout=180 update >/dev/null || die "apt-get update failed"
        (cd "$dest" && apt-get download postfix >/dev/null) || die "apt-get download postfix failed"
    fi
}

setup_postfix() {
    local pf="$WORK/postfix" libdir="$WORK/postfix/usr/lib/postfix" tool
    if [ ! -x "$pf/usr/sbin/smtp-source" ]; then
        local deb
        deb="$(mktemp -d)"
        download_postfix_deb "$deb"
        rm -rf "$pf"
        dpkg -x "$deb"/postfix_*.deb "$pf"
        dpkg-deb -f "$deb"/postfix_*.deb Version >"$pf/VERSION"
        rm -rf "$deb"
    fi
    # smtp-source links postfix's private libpostfix-*.so (shipped in the same .deb) and a
    # few ordinary system libraries; install only those libraries when they are missing.
    if LD_LIBRARY_PATH="$libdir" ldd "$pf/usr/sbin/smtp-source" "$pf/usr/sbin/smtp-sink" | grep -q 'not found'; then
        mapfile -t libs < <(apt-cache depends postfix | awk '$1 == "Depends:" && $2 ~ /^lib/ {print $2}')
        apt_install "${libs[@]}"
    fi
    if LD_LIBRARY_PATH="$libdir" ldd "$pf/usr/sbin/smtp-source" | grep 'not found'; then
        die "smtp-source still has unresolved libraries (above)"
    fi
    for tool in smtp-source smtp-sink; do
        cat >"$WORK/bin/$tool" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$pf/usr/sbin/$tool" "\$@"
EOF
        chmod +x "$WORK/bin/$tool"
    done
    # Without arguments both print their usage line and exit 1: that proves they run.
    local out
    out="$("$WORK/bin/smtp-source" 2>&1 || true)"
    [[ "$out" == *usage* ]] || die "smtp-source does not run: $out"
}

setup_python
setup_node
setup_postfix
log "ok: $("$WORK/venv/bin/python" -c 'import aiosmtpd; print("aiosmtpd", aiosmtpd.__version__)'), smtp-server $(cd "$WORK/node" && node -p 'require("smtp-server/package.json").version'), postfix $(cat "$WORK/postfix/VERSION") smtp-source/smtp-sink in $WORK/bin"
