#!/usr/bin/env bash
# Run every check and every test of the workspace; the one command CI runs.
#
# As root (CI), it first installs the system packages (scripts/install-deps.sh);
# the integration tests then run each PostgreSQL program as the `postgres` OS
# user. As an ordinary user, the packages must already be installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

if [[ $(id -u) -eq 0 ]]; then
    step "installing system packages"
    bash scripts/install-deps.sh
else
    step "checking system packages (not root: nothing is installed)"
    bash scripts/install-deps.sh --check || echo "test.sh: warning: packages are missing; the integration tests will fail" >&2
fi

step "installing the S3 test servers (moto, s3s-fs)"
# CI must have them: the S3 tests fail, never skip, when CI is set and a server is missing.
if [[ -n "${CI:-}" ]]; then
    bash scripts/s3-test-servers.sh
else
    bash scripts/s3-test-servers.sh || echo "test.sh: warning: the S3 test servers could not be installed; the S3 tests will be skipped" >&2
fi
export WALVAULT_MOTO_SERVER="${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}/moto/bin/moto_server"
export WALVAULT_S3S_FS="${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}/s3s-fs/bin/s3s-fs"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc"
# --lib: the binary `walvault` would collide with the library `walvault` in target/doc
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --lib

step "cargo build (the integration tests run the binaries)"
cargo build --workspace --bins

step "tests"
summary_log=$(mktemp)
trap 'rm -f "$summary_log"' EXIT
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast 2>&1 | tee "$summary_log"
else
    echo "test.sh: cargo-nextest not found, using cargo test" >&2
    cargo test --workspace --no-fail-fast
fi

step "doc tests"
cargo test --workspace --doc

if [[ -f scripts/fuzz-smoke.sh ]]; then
    step "fuzz smoke test"
    bash scripts/fuzz-smoke.sh
fi

step "all checks passed"
# One plain closing line with the counts of the test run above.
if summary=$(grep -Eo '[0-9]+ tests run: [0-9]+ passed' "$summary_log" | tail -n 1); then
    passed=${summary##*: }
    passed=${passed%% *}
    echo "tests: ${passed} passed, 0 failed"
fi
