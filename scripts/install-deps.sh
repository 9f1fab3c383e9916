#!/usr/bin/env bash
# Install the system packages walvault's tests need (Debian 12 "bookworm").
#
#   scripts/install-deps.sh          install what is missing (must run as root)
#   scripts/install-deps.sh --check  only report what is missing (any user)
#
# Idempotent: when every package is already installed, apt is not run at all.
# PostgreSQL's Debian package creates and starts a cluster "15 main" on port
# 5432; the tests never use it (each test starts its own cluster on its own
# socket), so it is stopped to save memory.
set -euo pipefail

PACKAGES=(
    postgresql-15         # initdb, postgres, pg_ctl, pgbench (server package)
    postgresql-client-15  # psql, pg_basebackup, pg_waldump
    zstd                  # zstd CLI, used by benchmarks and by hand when debugging objects
    pgbackrest            # the alternative the benchmarks compare against
    util-linux            # runuser / setpriv (run PostgreSQL as the `postgres` user)
    mount                 # mount / umount (the full-disk test mounts a small tmpfs)
)

log() { printf 'install-deps: %s\n' "$*"; }

check_only=false
case "${1:-}" in
    --check) check_only=true ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all packages already installed: ${PACKAGES[*]}"
elif $check_only; then
    log "missing packages: ${missing[*]}"
    log "install them with: sudo bash scripts/install-deps.sh"
    exit 1
else
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages: ${missing[*]}; run this script as root (e.g. with sudo)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "running: apt-get update"
    apt-get update
    log "running: apt-get install -y --no-install-recommends ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

pg_bin=/usr/lib/postgresql/15/bin
for prog in initdb pg_ctl postgres psql pgbench pg_basebackup; do
    if [[ ! -x "$pg_bin/$prog" ]]; then
        log "error: $pg_bin/$prog is missing after installation" >&2
        exit 1
    fi
done
if ! id -u postgres >/dev/null 2>&1; then
    log "error: the OS user 'postgres' does not exist (it is created by the postgresql-15 package)" >&2
    exit 1
fi

# Stop the cluster the Debian package created; the tests start their own.
if ! $check_only && [[ $(id -u) -eq 0 ]] && command -v pg_lsclusters >/dev/null 2>&1; then
    if pg_lsclusters --no-header 2>/dev/null | awk '$1 == "15" && $2 == "main" && $4 == "online"' | grep -q .; then
        log "stopping the Debian default cluster 15/main (tests use their own clusters)"
        pg_ctlcluster 15 main stop || true
    fi
fi

log "ok"
