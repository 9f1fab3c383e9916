#!/usr/bin/env bash
# Install what the benchmarks under bench/ need beyond scripts/install-deps.sh:
#
#   - barman-cli-cloud (barman-cloud-wal-archive / -wal-restore, with boto3),
#     the S3 archiver walvault-bench-s3 compares against;
#   - stunnel4 and openssl: pgBackRest speaks only HTTPS to S3, so the
#     benchmark puts a TLS terminator with a throw-away certificate in front
#     of the local S3 server;
#   - the S3 server itself, through scripts/s3-test-servers.sh (moto; s3s-fs
#     once that script installs it).
#
# Run as root on Debian 12. Idempotent: installed packages are not fetched
# again. Not run by CI (.ci/run), which stays lean: the benchmarks are run by
# hand (docs/benchmarks.md).
#
#   bash scripts/bench-deps.sh
set -euo pipefail

log() { printf 'bench-deps: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "run as root (it installs Debian packages)"
    exit 1
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# PostgreSQL 15, pgBackRest and zstd, as for every other benchmark and test.
bash "$here/install-deps.sh"

packages=(barman-cli-cloud stunnel4 openssl python3-boto3)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "already installed: ${packages[*]}"
fi

bash "$here/s3-test-servers.sh"

command -v stunnel4 >/dev/null || { log "stunnel4 is missing after installation"; exit 1; }
log "ready: barman-cloud-wal-archive $(barman-cloud-wal-archive --version 2>&1), $(pgbackrest version)"
