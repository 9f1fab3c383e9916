#!/usr/bin/env bash
# walvault quick start: build walvault, archive a live PostgreSQL 15 cluster
# into a local repository, take a base backup with `walvault backup`, drop a
# table by accident, and bring it back with a point-in-time restore
# (`walvault restore --target-time`) into a second cluster.
#
#   bash scripts/quickstart.sh            run it; keep the demo directory
#   bash scripts/quickstart.sh --clean    run it; remove the demo directory at the end
#
# Run as root on a Debian 12 machine (fresh or not). PostgreSQL runs as the
# `postgres` OS user, exactly as it would in production: archive_command =
# 'archive-push %p' comes unchanged from pg-config-examples/, restore_command
# is written by `walvault restore`. Both clusters listen only on a unix socket inside
# the demo directory, so they never clash with another PostgreSQL.
#
# Environment:
#   WALVAULT_QUICKSTART_DIR  demo directory (default /tmp/walvault-quickstart);
#                            removed first on every run
#   WALVAULT_PG_BIN          PostgreSQL programs (default /usr/lib/postgresql/15/bin)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SRC=$PWD

DEMO=${WALVAULT_QUICKSTART_DIR:-/tmp/walvault-quickstart}
PG_BIN=${WALVAULT_PG_BIN:-/usr/lib/postgresql/15/bin}
PRIMARY_PORT=54329
RESTORED_PORT=54330
MARKER=.walvault-quickstart   # proves a directory is ours before rm -rf

clean=false
case "${1:-}" in
    "") ;;
    --clean) clean=true ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--clean]" >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and runs PostgreSQL as the 'postgres' user)"
[[ $DEMO == /* && $DEMO != / ]] || die "WALVAULT_QUICKSTART_DIR must be an absolute path other than /"

# Everything PostgreSQL-side runs as `postgres`, from inside the demo
# directory (postgres may not be able to read the current directory), with
# the demo binaries first in PATH and the demo configuration: the server
# passes this environment on to archive_command and restore_command.
as_pg() {
    (cd "$DEMO" && runuser -u postgres -- env \
        PATH="$DEMO/bin:$PG_BIN:/usr/local/bin:/usr/bin:/bin" \
        WALVAULT_CONFIG="$DEMO/walvault.toml" \
        "$@")
}
psql_at() { # psql_at PORT SQL: one query, unaligned, no header
    as_pg psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$DEMO/run" -p "$1" -d postgres -c "$2"
}
running() { [[ -f $1/postmaster.pid ]]; }
stop_cluster() { # stop_cluster DATADIR: stops it if its postmaster is running
    if running "$1"; then
        echo "stopping the cluster in $1"
        as_pg pg_ctl -D "$1" -m fast -w stop >/dev/null || echo "quickstart: warning: could not stop the cluster in $1" >&2
    fi
}
show_log() {
    if [[ -f $1 ]]; then
        echo "---- last lines of $1" >&2
        tail -n 30 "$1" >&2
    fi
}
on_exit() {
    local rc=$?
    if [[ -f $DEMO/$MARKER ]]; then
        [[ $rc -eq 0 ]] || { show_log "$DEMO/primary.log"; show_log "$DEMO/restored.log"; }
        stop_cluster "$DEMO/restored"
        stop_cluster "$DEMO/primary"
    fi
    if [[ $rc -ne 0 ]]; then
        echo "quickstart: FAILED (exit $rc)" >&2
        [[ ! -f $DEMO/$MARKER ]] || echo "quickstart: the demo directory $DEMO is kept for inspection" >&2
    fi
}
trap on_exit EXIT

# ---------------------------------------------------------------------------
step "installing system packages (scripts/install-deps.sh)"
if [[ -f scripts/install-deps.sh ]]; then
    bash scripts/install-deps.sh
else
    echo "quickstart: warning: scripts/install-deps.sh not found; assuming PostgreSQL 15 is installed" >&2
fi
for prog in initdb pg_ctl psql pg_basebackup pgbench; do
    [[ -x $PG_BIN/$prog ]] || die "$PG_BIN/$prog not found: install postgresql-15 (scripts/install-deps.sh)"
done
id -u postgres >/dev/null 2>&1 || die "the OS user 'postgres' does not exist (the postgresql-15 package creates it)"

# ---------------------------------------------------------------------------
step "building walvault (cargo build --release --workspace --bins)"
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: walvault needs Rust 1.89 or newer; install it with rustup (https://rustup.rs), then re-run"
rust_version=$(rustc --version | awk '{print $2}')
if [[ $(printf '%s\n' 1.89.0 "$rust_version" | sort -V | head -n1) != 1.89.0 ]]; then
    die "Rust $rust_version is too old: walvault needs 1.89 or newer ('rustup update')"
fi
cargo build --release --workspace --bins
TARGET=${CARGO_TARGET_DIR:-$SRC/target}/release

# ---------------------------------------------------------------------------
step "preparing the demo directory $DEMO"
if [[ -e $DEMO ]]; then
    [[ -f $DEMO/$MARKER ]] || die "$DEMO exists and was not made by this script; remove it or set WALVAULT_QUICKSTART_DIR"
    stop_cluster "$DEMO/restored"
    stop_cluster "$DEMO/primary"
    rm -rf "$DEMO"
fi
mkdir -p "$DEMO/bin" "$DEMO/run"
touch "$DEMO/$MARKER"
install -m 0755 "$TARGET/archive-push" "$TARGET/archive-fetch" "$TARGET/walvault" "$DEMO/bin/"
cat >"$DEMO/walvault.toml" <<EOF
# walvault configuration of the quick start (see pg-config-examples/walvault.toml)
cluster = "main"
repository = "$DEMO/repo"
catalog = "$DEMO/catalog/catalog.db"
EOF
# The repository, the catalog and the clusters are written by `postgres`.
chown -R postgres:postgres "$DEMO"
chmod 0755 "$DEMO" "$DEMO/bin"
echo "binaries:      $DEMO/bin"
echo "configuration: $DEMO/walvault.toml"

# ---------------------------------------------------------------------------
step "creating the primary cluster ($DEMO/primary, socket $DEMO/run, port $PRIMARY_PORT)"
as_pg initdb -D "$DEMO/primary" -A trust -U postgres --no-instructions >"$DEMO/initdb.log"
as_pg cp "$SRC/pg-config-examples/archive.conf" "$DEMO/primary/archive.conf"
as_pg tee "$DEMO/primary/quickstart.conf" >/dev/null <<EOF
listen_addresses = ''
port = $PRIMARY_PORT
unix_socket_directories = '$DEMO/run'
EOF
as_pg tee -a "$DEMO/primary/postgresql.conf" >/dev/null <<EOF
include 'archive.conf'
include 'quickstart.conf'
EOF
echo "archiving settings (pg-config-examples/archive.conf):"
grep -v '^#' "$DEMO/primary/archive.conf" | sed 's/^/    /'

step "walvault init --pgdata $DEMO/primary"
as_pg walvault init --pgdata "$DEMO/primary"

step "starting the primary (PATH=$DEMO/bin:... WALVAULT_CONFIG=$DEMO/walvault.toml)"
as_pg pg_ctl -D "$DEMO/primary" -l "$DEMO/primary.log" -w -t 120 start >/dev/null

step "writing data: pgbench -i -s 5 and a table of orders"
as_pg pgbench -h "$DEMO/run" -p "$PRIMARY_PORT" -i -s 5 -q postgres 2>&1 | tail -n 1
psql_at "$PRIMARY_PORT" "CREATE TABLE orders AS
    SELECT g AS id, md5(g::text) AS payload FROM generate_series(1, 100000) AS g"

step "walvault backup --fast (a base backup of the running primary)"
as_pg env PGHOST="$DEMO/run" PGPORT="$PRIMARY_PORT" PGUSER=postgres PGDATABASE=postgres walvault backup --fast

step "more work after the backup: 10 s of pgbench and more orders"
as_pg pgbench -h "$DEMO/run" -p "$PRIMARY_PORT" -c 4 -j 2 -T 10 postgres 2>&1 | grep -E '^(number of transactions actually processed|tps)' || true
psql_at "$PRIMARY_PORT" "INSERT INTO orders SELECT g, 'late ' || md5(g::text) FROM generate_series(100001, 120000) AS g"

CHECKSUM_SQL="SELECT (SELECT count(*) || ' orders, md5 ' || md5(string_agg(id || ':' || payload, ',' ORDER BY id)) FROM orders)
    || ', accounts ' || (SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts)
    || ', history ' || (SELECT count(*) FROM pgbench_history)"
before_sum=$(psql_at "$PRIMARY_PORT" "$CHECKSUM_SQL")
before_time=$(psql_at "$PRIMARY_PORT" "SELECT clock_timestamp()")
echo "at $before_time: $before_sum"
sleep 1

step "the accident: DROP TABLE orders (and the application keeps writing)"
psql_at "$PRIMARY_PORT" "DROP TABLE orders"
as_pg pgbench -h "$DEMO/run" -p "$PRIMARY_PORT" -c 2 -T 3 postgres >/dev/null 2>&1

step "switching to a new WAL segment and waiting until the old one is archived"
last_segment=$(psql_at "$PRIMARY_PORT" "SELECT pg_walfile_name(pg_switch_wal())")
echo "waiting for $last_segment"
for _ in $(seq 120); do
    archived=$(psql_at "$PRIMARY_PORT" "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    # Same timeline, so file names sort like positions.
    [[ $archived < $last_segment ]] || break
    sleep 0.5
done
psql_at "$PRIMARY_PORT" "SELECT 'pg_stat_archiver: archived_count=' || archived_count
    || ' last_archived_wal=' || coalesce(last_archived_wal, '-')
    || ' failed_count=' || failed_count FROM pg_stat_archiver"
[[ ! $archived < $last_segment ]] || die "$last_segment was not archived within 60 s (see $DEMO/primary.log)"

step "walvault info (backups and the recoverable window)"
as_pg walvault info

# ---------------------------------------------------------------------------
step "walvault restore --target-time '$before_time' (the moment before the DROP)"
as_pg walvault restore --pgdata "$DEMO/restored" --target-time "$before_time" --target-action promote
# The restored copy listens elsewhere and, being a copy, does not archive:
# after promotion it would publish a timeline 2 into the primary's archive.
as_pg tee "$DEMO/restored/quickstart.conf" >/dev/null <<EOF
listen_addresses = ''
port = $RESTORED_PORT
unix_socket_directories = '$DEMO/run'
archive_mode = off
EOF
echo "recovery settings written by walvault restore (postgresql.auto.conf):"
grep -E '^(restore_command|recovery_target)' "$DEMO/restored/postgresql.auto.conf" | sed 's/^/    /'
as_pg pg_ctl -D "$DEMO/restored" -l "$DEMO/restored.log" -w -t 120 start >/dev/null

echo "waiting for the end of recovery"
for _ in $(seq 240); do
    in_recovery=$(psql_at "$RESTORED_PORT" "SELECT pg_is_in_recovery()" 2>/dev/null || echo t)
    [[ $in_recovery == t ]] || break
    sleep 0.5
done
[[ $in_recovery == f ]] || die "the restored cluster is still in recovery after 120 s (see $DEMO/restored.log)"
restored_files=$(grep -o 'restored log file "[^"]*"' "$DEMO/restored.log" | sort -u | wc -l)
echo "recovery complete: archive-fetch restored $restored_files WAL files;" \
    "$(grep -oE 'recovery stopping before [^,]*' "$DEMO/restored.log" | tail -n 1 || true)"

step "comparing the data with the moment before the accident"
restored_sum=$(psql_at "$RESTORED_PORT" "$CHECKSUM_SQL")
echo "before the DROP: $before_sum"
echo "restored:        $restored_sum"
[[ $before_sum == "$restored_sum" ]] || die "the restored data differs from the data before the DROP"
echo "identical: the dropped table is back"

step "stopping the clusters"
stop_cluster "$DEMO/primary"
stop_cluster "$DEMO/restored"

# ---------------------------------------------------------------------------
step "done: archiving, a base backup and a point-in-time restore brought the dropped table back"
if $clean; then
    rm -rf "$DEMO"
    echo "removed $DEMO"
else
    cat <<EOF
The demo directory is kept: $DEMO
  repository   $DEMO/repo
  catalog      $DEMO/catalog/catalog.db
  clusters     $DEMO/primary, $DEMO/restored (stopped; logs in $DEMO/*.log)
Look around, as the postgres user:
  runuser -u postgres -- env WALVAULT_CONFIG=$DEMO/walvault.toml $DEMO/bin/walvault info --json
Remove it with: rm -rf $DEMO   (or re-run with --clean)
EOF
fi
