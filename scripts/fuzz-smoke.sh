#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target of fuzz/ (the parsers of
# walvault-formats) and runs each one briefly from its seeds in fuzz/seeds/.
# Exits non-zero if any target fails to build or finds a crash; the crashing
# input is kept in fuzz/artifacts/<target>/ and printed in hex.
#
#   bash scripts/fuzz-smoke.sh                  # every target, 15 s each
#   FUZZ_SECONDS=120 bash scripts/fuzz-smoke.sh lsn history
#
# Environment:
#   FUZZ_SECONDS    fuzzing time per target (default 15)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer: none (default) or address
#
# Works on a stable toolchain: cargo-fuzz passes nightly-only flags
# (-Zsanitizer, sancov passes), which RUSTC_BOOTSTRAP=1 lets stable rustc
# accept. cargo-fuzz itself is installed from crates.io when missing
# (about 1.5 minutes of compiling on 2 cores).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-15}
sanitizer=${FUZZ_SANITIZER:-none}
all_targets=(wal_file_name lsn segment_header history object_decode manifest timestamp)
if [[ $# -gt 0 ]]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
log_dir=fuzz/target/fuzz-smoke-logs

step() { printf '\n==> fuzz-smoke: %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
elapsed() { printf '%ss' "$SECONDS"; }

export RUSTC_BOOTSTRAP=1

step "cargo-fuzz"
if cargo fuzz --version >/dev/null 2>&1; then
    echo "found $(cargo fuzz --version)"
else
    echo "cargo-fuzz not found, installing version $CARGO_FUZZ_VERSION from crates.io"
    run cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

step "building ${#targets[@]} targets (sanitizer: $sanitizer) [$(elapsed)]"
if [[ $# -eq 0 ]]; then
    run cargo fuzz build --sanitizer "$sanitizer"
else
    for t in "${targets[@]}"; do
        run cargo fuzz build --sanitizer "$sanitizer" "$t"
    done
fi

mkdir -p "$log_dir"
failed=()
for t in "${targets[@]}"; do
    step "running $t for ${seconds}s [$(elapsed)]"
    # The first directory collects what the fuzzer finds (fuzz/corpus is
    # ignored by git); the seeds are only read.
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="$log_dir/$t.log"
    status=0
    cmd=(cargo fuzz run --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" --
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    printf '+ %s > %s\n' "${cmd[*]}" "$log"
    "${cmd[@]}" >"$log" 2>&1 || status=$?
    if [[ $status -eq 0 ]]; then
        grep -E '^(Done|#[0-9]+[[:space:]]+DONE)' "$log" || true
        echo "$t: ok (log: $log)"
        continue
    fi
    failed+=("$t")
    echo "$t: FAILED with status $status; from $log:" >&2
    # From the first sign of trouble (a panic, a sanitizer or libFuzzer
    # error), or else the end of the log.
    trouble='panicked at|memory allocation of|ERROR:|SUMMARY:'
    if grep -q -E "$trouble" "$log"; then
        sed -n -E "/$trouble/,\$p" "$log" | head -n 40 >&2 || true
    else
        tail -n 40 "$log" >&2
    fi
    artifact=$(grep -o 'Test unit written to .*' "$log" | tail -n 1 | sed 's/^Test unit written to //' || true)
    if [[ -n "$artifact" && -f "$artifact" ]]; then
        echo "$t: crashing input ($(wc -c <"$artifact") bytes) in $artifact, hex:" >&2
        od -An -v -tx1 "$artifact" | tr -d ' \n' >&2
        echo >&2
        echo "$t: reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $t $artifact" >&2
    fi
done

step "done in $(elapsed)"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz-smoke: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets ran ${seconds}s each without a crash"
