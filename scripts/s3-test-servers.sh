#!/usr/bin/env bash
# Install the S3 server the tests run against: moto (`moto_server`), in a
# Python virtual environment, so the S3 tests talk to a real S3 API on
# 127.0.0.1. The tests start and stop the server themselves
# (integration/src/s3.rs); this script only installs it.
#
#   scripts/s3-test-servers.sh          install moto if missing
#   scripts/s3-test-servers.sh --path   install if missing, then print the path of moto_server
#
# The venv lives in ${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}/moto.
# Idempotent: when moto_server is already there, pip is not run.
set -euo pipefail

MOTO_VERSION="5.2"   # pinned minor; moto's conditional create (If-None-Match: *) is atomic
tools=${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}
venv="$tools/moto"
server="$venv/bin/moto_server"

log() { printf 's3-test-servers: %s\n' "$*" >&2; }

print_path=false
case "${1:-}" in
    --path) print_path=true ;;
    "") ;;
    *) echo "usage: $0 [--path]" >&2; exit 2 ;;
esac

if [[ ! -x "$server" ]]; then
    log "installing moto[server]==${MOTO_VERSION}.* into $venv"
    mkdir -p "$tools"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==${MOTO_VERSION}.*"
    [[ -x "$server" ]] || { log "pip finished but $server is missing"; exit 1; }
else
    log "moto already installed: $server"
fi

if $print_path; then
    echo "$server"
fi
