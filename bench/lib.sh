# Shell functions the benchmark scripts share; sourced, never run.
#
# The callers set PGBIN (PostgreSQL's bin directory), T (the run's
# directory, with T/sock for the server's socket), PORT (the source server's
# port) and PGDATA (its data directory) before using what needs them.

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
as_pg() { runuser -u postgres -- "$@"; }
sql() { as_pg "$PGBIN/psql" -h "$T/sock" -p "$PORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
dir_bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'; }

wait_for() { # seconds description command...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    echo "timed out waiting for $what" >&2
    return 1
}

# server_conf DATADIR [EXTRA]: the settings every benchmark server runs
# with (loopback only, autovacuum off for repeatability), then EXTRA lines.
server_conf() {
    cat >>"$1/postgresql.conf" <<CONF
# written by the benchmark
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$T/sock'
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
max_wal_size = 8GB
checkpoint_timeout = 30min
autovacuum = off
logging_collector = off
${2:-}
CONF
}

# pgbr_write_conf CONF REPO: pgBackRest's configuration for the stanza
# `bench` of the server in PGDATA, zstd level 1 as Strata, one process per
# core, a fast checkpoint; the repository directory made for postgres.
pgbr_write_conf() {
    cat >"$1" <<CONF
[global]
repo1-path=$2
repo1-retention-full=99
log-path=$T/pgbackrest-log
lock-path=$T/pgbackrest-lock
spool-path=$T/pgbackrest-spool
log-level-console=warn
log-level-file=off
compress-type=zst
compress-level=1
process-max=$(nproc)
start-fast=y

[bench]
pg1-path=$PGDATA
pg1-port=$PORT
pg1-socket-path=$T/sock
pg1-user=postgres
CONF
    mkdir -p "$2"
    chown postgres "$1" "$2"
}

# mixed_dataset_plan SIZE_GB: sets SCALE, TEXT_ROWS and BYTEA_ROWS for a
# dataset of about SIZE_GB: ~40 % pgbench (about 15.5 MB per scale unit with
# indexes), 30 % rows of random hex text (~340 bytes on disk, compress about
# 2×), 30 % rows of 1000 random bytes (~1070 bytes on disk, incompressible).
mixed_dataset_plan() {
    read -r SCALE TEXT_ROWS BYTEA_ROWS < <(python3 - "$1" <<'PY'
import sys
gb = float(sys.argv[1]) * 2**30
print(max(1, round(gb * 0.4 / 15.5e6)), max(1000, int(gb * 0.3 / 340)), max(1000, int(gb * 0.3 / 1070)))
PY
    )
}
TEXT_EXPR="md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text)"

# load_mixed_dataset: the planned dataset into the server on PORT (the two
# tables filled at once), without the final VACUUM and CHECKPOINT.
load_mixed_dataset() {
    as_pg "$PGBIN/pgbench" -h "$T/sock" -p "$PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
    sql "CREATE EXTENSION IF NOT EXISTS pgcrypto"
    sql "CREATE TABLE bench_text (id bigint PRIMARY KEY, body text NOT NULL)" >/dev/null
    sql "CREATE TABLE bench_bytes (id bigint PRIMARY KEY, data bytea NOT NULL)" >/dev/null
    sql "INSERT INTO bench_text SELECT g, $TEXT_EXPR FROM generate_series(1, $TEXT_ROWS) g" &
    local p1=$!
    sql "INSERT INTO bench_bytes SELECT g, gen_random_bytes(1000) FROM generate_series(1, $BYTEA_ROWS) g" &
    local p2=$!
    wait $p1 $p2
}
