#!/usr/bin/env bash
# Install the S3 servers the tests run against, so the S3 tests talk to a
# real S3 API on 127.0.0.1:
#
# - moto (`moto_server`), in a Python virtual environment: atomic
#   conditional create, so the create-once race test runs there; it does not
#   verify signatures.
# - s3s-fs (`s3s-fs`), a Rust S3 server over a directory: it verifies SigV4
#   signatures, so the wrong-credentials test runs there.
#
# The tests start and stop the servers themselves (integration/src/s3.rs);
# this script only installs them.
#
#   scripts/s3-test-servers.sh          install what is missing
#   scripts/s3-test-servers.sh --path   install what is missing, then print
#                                       the paths of moto_server and s3s-fs
#
# Everything lives in ${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}:
# moto in moto/, s3s-fs in s3s-fs/bin/. Idempotent: what is already there
# is not installed again (pip and cargo are not run).
set -euo pipefail

MOTO_VERSION="5.2"       # pinned minor; moto's conditional create (If-None-Match: *) is atomic
S3S_FS_VERSION="0.14.1"  # pinned exactly: later versions need a newer Rust
tools=${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}
venv="$tools/moto"
server="$venv/bin/moto_server"
s3s_root="$tools/s3s-fs"
s3s_fs="$s3s_root/bin/s3s-fs"

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

if [[ ! -x "$s3s_fs" ]]; then
    log "installing s3s-fs ${S3S_FS_VERSION} into $s3s_root (cargo install; a few minutes)"
    mkdir -p "$s3s_root"
    # A target directory of its own, removed afterwards: only the binary is kept.
    build_dir=$(mktemp -d "${TMPDIR:-/tmp}/walvault-s3s-fs-build.XXXXXX")
    trap 'rm -rf "$build_dir"' EXIT
    CARGO_TARGET_DIR="$build_dir" cargo install "s3s-fs@${S3S_FS_VERSION}" --features binary --locked \
        --root "$s3s_root" --quiet
    [[ -x "$s3s_fs" ]] || { log "cargo install finished but $s3s_fs is missing"; exit 1; }
else
    log "s3s-fs already installed: $s3s_fs"
fi

if $print_path; then
    echo "$server"
    echo "$s3s_fs"
fi
