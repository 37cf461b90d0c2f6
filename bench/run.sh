#!/usr/bin/env bash
# Side-by-side benchmark: Strata against pg_basebackup and pgBackRest on one
# PostgreSQL 15 server and one mixed dataset (pgbench tables, random text,
# incompressible bytea). Measures full backups, a second backup after ~1 % of
# rows changed, restore + recovery to a target time, WAL archive lag under a
# saturating pgbench run, CPU seconds, peak RSS and bytes stored, then writes
# a table with ratios against each peer (docs/BENCHMARKS.md by default).
#
#   bench/run.sh [--size-gb N] [--reps N] [--lag-secs N] [--quick] [--keep]
#                [--out FILE] [--strata-bin PATH] [--no-install] [--no-pg17]
#                [--relations N]
#
# --relations N adds N small tables (a primary key and a few rows each, so
# about four files each once vacuumed) to the dataset: per-file costs.
#
# Last, the same dataset on PostgreSQL 17 with summarize_wal = on: Strata's
# full backup against its backup after ~1 % change, where the server sends
# only changed blocks (pgBackRest 2.45 from Debian does not support 17).
#
# BENCH_NOTE="text" adds a sentence to the report (e.g. about other load).
#
# Run as root on Debian 12 with PostgreSQL 15 installed; installs pgbackrest,
# time and python3 from apt when missing and builds Strata in release mode.
# Clusters run as the `postgres` OS user; all data lives under one temporary
# directory, all traffic stays on loopback, and everything started here is
# stopped on exit.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

SIZE_GB=2
REPS=3
PG17=1
RELATIONS=0
LAG_SECS=60
QUICK=0
KEEP=0
INSTALL=1
OUT=""
STRATA=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size-gb) SIZE_GB=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --lag-secs) LAG_SECS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --keep) KEEP=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        --strata-bin) STRATA=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --no-pg17) PG17=0; shift ;;
        --relations) RELATIONS=$2; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    # A smoke run: tiny data, one repetition, short load. Numbers mean nothing.
    SIZE_GB=0.02
    REPS=1
    LAG_SECS=3
fi
RESTORE_LOAD_SECS=$([ "$QUICK" = 1 ] && echo 2 || echo 10)
DRAIN_SECS=$([ "$QUICK" = 1 ] && echo 2 || echo 5)
[ -n "$OUT" ] || OUT=$([ "$QUICK" = 1 ] && echo "" || echo "$ROOT/docs/BENCHMARKS.md")

[ "$(id -u)" = 0 ] || { echo "run as root (clusters run as the postgres OS user)" >&2; exit 1; }
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found in $PGBIN (apt-get install postgresql-15)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

# ---- tools -------------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
    missing=()
    command -v pgbackrest >/dev/null || missing+=(pgbackrest)
    [ -x /usr/bin/time ] || missing+=(time)
    command -v python3 >/dev/null || missing+=(python3)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
    fi
fi
for t in pgbackrest /usr/bin/time python3; do
    command -v "$t" >/dev/null || { echo "$t is missing" >&2; exit 1; }
done
if [ -z "$STRATA" ]; then
    log "building Strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata)
    STRATA=${CARGO_TARGET_DIR:-$ROOT/target}/release/strata
fi
[ -x "$STRATA" ] || { echo "no strata binary at $STRATA" >&2; exit 1; }

# ---- sandbox -----------------------------------------------------------------
T=$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-XXXXXX")
chmod 755 "$T"
chown postgres "$T"
mkdir -p "$T/sock" "$T/times"
chown postgres "$T/sock"
RESULTS=$T/results.tsv
: >"$RESULTS"
printf 'setup\tmachine\t0\tload_start\t%s\n' "$(cut -d' ' -f1 /proc/loadavg)" >>"$RESULTS"

PORT=$(free_port)
RPORT=$(free_port)
PGDATA=$T/pgdata
PGBR_CONF=$T/pgbackrest.conf

BG_PIDS=()
cleanup() {
    trap - ERR
    set +e
    for pid in "${BG_PIDS[@]}"; do
        # /usr/bin/time ignores SIGINT: signal what it runs as well.
        pkill -INT -P "$pid" 2>/dev/null
        kill -INT "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    for d in "$T"/restore-*; do
        [ -d "$d" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1
    done
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate >/dev/null 2>&1
    [ -d "$T/pgdata17" ] && runuser -u postgres -- "$PG17BIN/pg_ctl" -D "$T/pgdata17" stop -m immediate >/dev/null 2>&1
    if [ "$KEEP" = 1 ]; then
        echo "kept $T" >&2
    else
        rm -rf "$T"
    fi
}
# A step that fails (set -e) shows the logs of what it ran before they go.
on_error() {
    local rc=$?
    trap - ERR
    echo "bench: a step failed (exit $rc); the last lines of its logs:" >&2
    for f in "$T"/strata-*.log "$T"/restore-*.log "$T"/restore-strata/strata-restore.log; do
        [ -f "$f" ] || continue
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
}
trap on_error ERR
trap cleanup EXIT
trap 'exit 130' INT TERM

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"; }

# timed PHASE TOOL REP -- command...: wall clock, CPU and peak RSS of the command.
timed() {
    local phase=$1 tool=$2 rep=$3
    shift 4
    local tf="$T/times/$phase-$tool-$rep.txt" t0 t1
    t0=$(now)
    /usr/bin/time -v -o "$tf" "$@"
    t1=$(now)
    record "$phase" "$tool" "$rep" wall "$(elapsed "$t0" "$t1")"
    record "$phase" "$tool" "$rep" time_file "$tf"
}

# ---- source cluster ----------------------------------------------------------
log "initdb in $T (port $PORT)"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
cat >"$T/pgbackrest-archive-push.sh" <<SH
#!/bin/sh
# archive_command for the pgBackRest runs; per-call CPU and RSS go to a file.
exec /usr/bin/time -a -o "$T/times/archive-push.txt" -f "%e %U %S %M" \
    pgbackrest --config="$PGBR_CONF" --stanza=bench archive-push "\$1"
SH
chmod 755 "$T/pgbackrest-archive-push.sh"
touch "$T/times/archive-push.txt"
chown postgres "$T/times" "$T/times/archive-push.txt"
server_conf "$PGDATA" "archive_mode = on
archive_command = '$T/pgbackrest-archive-push.sh %p'"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$T/pg.log" -w start >/dev/null

pgbr_conf() { pgbr_write_conf "$PGBR_CONF" "$1"; } # repo directory
pgbr() { as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench "$@"; }

# ---- dataset -----------------------------------------------------------------
mixed_dataset_plan "$SIZE_GB"
log "dataset: pgbench scale $SCALE, $TEXT_ROWS text rows, $BYTEA_ROWS bytea rows"
load_relations() { # RELATIONS small tables, 200 per transaction (each takes locks)
    local from
    for ((from = 1; from <= RELATIONS; from += 200)); do
        sql "DO \$\$ BEGIN
               FOR i IN $from..LEAST($from + 199, $RELATIONS) LOOP
                 EXECUTE format('CREATE TABLE bench_rel_%s (id int PRIMARY KEY, note text NOT NULL)', i);
                 EXECUTE format('INSERT INTO bench_rel_%s SELECT g, md5(g::text || %L) FROM generate_series(1, 40) g', i, i);
               END LOOP;
             END \$\$" >/dev/null
    done
}
load_dataset() { # into the server on $PORT
    load_mixed_dataset
    load_relations
    sql "VACUUM (FREEZE, ANALYZE)"
    sql "CHECKPOINT"
}
t0=$(now)
load_dataset
DB_BYTES=$(sql "SELECT sum(pg_database_size(oid)) FROM pg_database")
DATA_BYTES=$(dir_bytes "$PGDATA")
log "dataset ready in $(elapsed "$t0" "$(now)") s: databases $((DB_BYTES / 1048576)) MiB, data directory $((DATA_BYTES / 1048576)) MiB"
record setup dataset 0 db_bytes "$DB_BYTES"
record setup dataset 0 data_dir_bytes "$DATA_BYTES"
record setup dataset 0 pgbench_scale "$SCALE"
record setup dataset 0 text_rows "$TEXT_ROWS"
record setup dataset 0 bytea_rows "$BYTEA_ROWS"
record setup dataset 0 relations "$RELATIONS"
record setup dataset 0 files "$(find "$PGDATA/base" "$PGDATA/global" -type f | wc -l)"

strata_conf() { # data directory -> config file
    mkdir -p "$1"
    printf 'data_dir = "%s"\n' "$1" >"$1.toml"
    echo "$1.toml"
}
strata_repo_bytes() { # data directory: packs and manifests (WAL excluded)
    dir_bytes "$1/repo/packs" "$1/repo/instances/bench/backups"
}
pgbr_set_bytes() { # bytes the newest backup set added to the repository
    pgbr info --output=json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup"][-1]["info"]["repository"]["delta"])'
}

# ---- full backups ------------------------------------------------------------
TOOLS=(strata pgbb_zstd pgbb pgbackrest)
full_backup() { # tool rep
    local tool=$1 rep=$2 out
    case $tool in
        strata)
            rm -rf "$T"/strata-full-*
            local cfg
            cfg=$(strata_conf "$T/strata-full-$rep")
            "$STRATA" --config "$cfg" instance add bench --host 127.0.0.1 --port "$PORT" --user postgres >/dev/null
            timed full strata "$rep" -- "$STRATA" --config "$cfg" backup create bench >/dev/null 2>"$T/strata-backup.log"
            record full strata "$rep" bytes "$(strata_repo_bytes "$T/strata-full-$rep")"
            STRATA_CFG=$cfg
            ;;
        pgbb_zstd | pgbb)
            out=$T/pgbb-$tool-$rep
            local compress=()
            [ "$tool" = pgbb_zstd ] && compress=(--compress=client-zstd:1)
            timed full "$tool" "$rep" -- "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres \
                -D "$out" -Ft -X stream -c fast "${compress[@]}"
            record full "$tool" "$rep" bytes "$(dir_bytes "$out"/base.tar*)"
            rm -rf "$out"
            ;;
        pgbackrest)
            rm -rf "$T"/pgbr-repo-*
            pgbr_conf "$T/pgbr-repo-$rep"
            pgbr stanza-create >/dev/null
            timed full pgbackrest "$rep" -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" \
                --stanza=bench --type=full backup
            record full pgbackrest "$rep" bytes "$(pgbr_set_bytes)"
            ;;
    esac
}

rotate() { # rep -> the tools in this repetition's order
    local r=$1 n=${#TOOLS[@]} i
    for ((i = 0; i < n; i++)); do echo "${TOOLS[$(((i + r) % n))]}"; done
}

for ((rep = 1; rep <= REPS; rep++)); do
    for tool in $(rotate "$rep"); do
        log "full backup $rep/$REPS: $tool"
        full_backup "$tool" "$rep"
    done
done
# The last repetition's Strata and pgBackRest repositories stay for the
# second-backup and restore runs.

# ---- second backup after ~1 % of rows changed --------------------------------
change_one_percent() { # rep: updates a contiguous 1 % key range of every table
    local r=$1
    local acc=$((SCALE * 100000))
    local start_pct=$(((r * 37) % 90 + 5))
    sql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid >= $((acc * start_pct / 100)) AND aid < $((acc * start_pct / 100 + acc / 100))"
    sql "UPDATE bench_text SET body = $TEXT_EXPR WHERE id >= $((TEXT_ROWS * start_pct / 100)) AND id < $((TEXT_ROWS * start_pct / 100 + TEXT_ROWS / 100))"
    sql "UPDATE bench_bytes SET data = gen_random_bytes(1000) WHERE id >= $((BYTEA_ROWS * start_pct / 100)) AND id < $((BYTEA_ROWS * start_pct / 100 + BYTEA_ROWS / 100))"
    sql "CHECKPOINT"
}
for ((rep = 1; rep <= REPS; rep++)); do
    log "incremental $rep/$REPS: changing 1 % of rows"
    change_one_percent "$rep"
    order=(strata pgbackrest)
    [ $((rep % 2)) = 0 ] && order=(pgbackrest strata)
    for tool in "${order[@]}"; do
        log "incremental $rep/$REPS: $tool"
        if [ "$tool" = strata ]; then
            before=$(strata_repo_bytes "${STRATA_CFG%.toml}")
            timed incr strata "$rep" -- "$STRATA" --config "$STRATA_CFG" backup create bench >/dev/null 2>"$T/strata-backup.log"
            record incr strata "$rep" bytes "$(($(strata_repo_bytes "${STRATA_CFG%.toml}") - before))"
        else
            timed incr pgbackrest "$rep" -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" \
                --stanza=bench --type=incr backup
            record incr pgbackrest "$rep" bytes "$(pgbr_set_bytes)"
        fi
    done
done

# ---- restore + recovery to a target time -------------------------------------
segment_end_of() { # WAL file name -> LSN just past that segment (16 MiB segments)
    python3 -c 'import sys; n=sys.argv[1]; s=int(n[8:16],16)*256+int(n[16:24],16)+1; p=s*16*2**20; print("%X/%X" % (p>>32, p & 0xffffffff))' "$1"
}
lsn_ge() { python3 -c 'import sys; f=lambda s: (int(s.split("/")[0],16)<<32)+int(s.split("/")[1],16); sys.exit(0 if f(sys.argv[1])>=f(sys.argv[2]) else 1)' "$1" "$2"; }
strata_stored_end() {
    "$STRATA" --config "$STRATA_CFG" wal list bench --json |
        python3 -c 'import json,sys; f=lambda s: (int(s.split("/")[0],16)<<32)+int(s.split("/")[1],16); e=max((f(w["end_lsn"]) for w in json.load(sys.stdin)), default=0); print("%X/%X" % (e>>32, e&0xffffffff))'
}
strata_stored_past() { lsn_ge "$(strata_stored_end)" "$1"; }
pgbr_archived_past() { # lsn
    local last
    last=$(sql "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    [ -n "$last" ] && lsn_ge "$(segment_end_of "$last")" "$1"
}

log "restore workload: WAL receiver on, pgbench for ${RESTORE_LOAD_SECS} s"
"$STRATA" --config "$STRATA_CFG" wal receive bench >"$T/receiver-restore.log" 2>&1 &
RECEIVER=$!
BG_PIDS+=("$RECEIVER")
wait_for 30 "the WAL receiver" grep -qs "streaming WAL" "$T/receiver-restore.log"
as_pg "$PGBIN/pgbench" -h "$T/sock" -p "$PORT" -U postgres -n -c 4 -j 2 -T "$RESTORE_LOAD_SECS" postgres >/dev/null 2>&1 &
LOAD=$!
sleep "$(awk -v s="$RESTORE_LOAD_SECS" 'BEGIN { print s / 2 }')"
TARGET=$(sql "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
wait "$LOAD"
SWITCH=$(sql "SELECT pg_switch_wal()")
sql "SELECT pg_switch_wal()" >/dev/null
wait_for 120 "pgBackRest to archive $SWITCH" pgbr_archived_past "$SWITCH"
wait_for 120 "Strata to store $SWITCH" strata_stored_past "$SWITCH"
kill -INT "$RECEIVER" && wait "$RECEIVER" || true
BG_PIDS=()
log "recovery target: $TARGET (WAL switched at $SWITCH)"
record restore target 0 time "$TARGET"

restore_run() { # tool rep
    local tool=$1 rep=$2 dir=$T/restore-$1
    rm -rf "$dir"
    case $tool in
        strata)
            timed restore strata "$rep" -- "$STRATA" --config "$STRATA_CFG" restore bench \
                --target-dir "$dir" --time "$TARGET" --start --port "$RPORT" >/dev/null 2>"$T/strata-restore.log"
            ;;
        pgbackrest)
            local t0 t1 tr
            t0=$(now)
            mkdir -p "$dir" && chown postgres "$dir" && chmod 700 "$dir"
            /usr/bin/time -v -o "$T/times/restore-pgbackrest-$rep.txt" runuser -u postgres -- \
                pgbackrest --config="$PGBR_CONF" --stanza=bench --pg1-path="$dir" restore \
                --type=time "--target=$(echo "${TARGET%Z}" | tr T ' ')+00" --target-action=promote
            tr=$(now)
            as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$T/restore-pgbackrest.log" -W \
                -o "-p $RPORT -c archive_mode=off" start >/dev/null
            wait_for 600 "the pgBackRest restore to finish recovery" bash -c \
                "[ \"\$(runuser -u postgres -- '$PGBIN/psql' -h 127.0.0.1 -p $RPORT -U postgres -d postgres -XAtqc 'SELECT pg_is_in_recovery()' 2>/dev/null)\" = f ]"
            t1=$(now)
            record restore pgbackrest "$rep" wall "$(elapsed "$t0" "$t1")"
            record restore pgbackrest "$rep" files_wall "$(elapsed "$t0" "$tr")"
            record restore pgbackrest "$rep" time_file "$T/times/restore-pgbackrest-$rep.txt"
            ;;
    esac
    # Both must have stopped at the same place: check the row count.
    record restore "$tool" "$rep" history_rows "$(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$RPORT" -U postgres -d postgres -XAtqc 'SELECT count(*) FROM pgbench_history')"
    as_pg "$PGBIN/pg_ctl" -D "$dir" stop -m immediate >/dev/null
    rm -rf "$dir"
}
for ((rep = 1; rep <= REPS; rep++)); do
    order=(strata pgbackrest)
    [ $((rep % 2)) = 0 ] && order=(pgbackrest strata)
    for tool in "${order[@]}"; do
        log "restore $rep/$REPS: $tool"
        restore_run "$tool" "$rep"
    done
done

# ---- WAL archive lag under saturating pgbench --------------------------------
LAG_CLIENTS=8
lag_run() { # tool
    local tool=$1 stop=$T/lag-$1.stop
    rm -f "$stop"
    python3 "$BENCH/lag.py" --tool "$tool" --psql "$PGBIN/psql" --host "$T/sock" --port "$PORT" \
        --strata "$STRATA" --strata-config "$STRATA_CFG" --instance bench \
        --stop-file "$stop" --out "$T/lag-$tool.jsonl" &
    local sampler=$!
    BG_PIDS+=("$sampler")
    sleep 1
    record lag "$tool" 1 load_start "$(now)"
    as_pg "$PGBIN/pgbench" -h "$T/sock" -p "$PORT" -U postgres -n -c "$LAG_CLIENTS" -j 2 -T "$LAG_SECS" postgres \
        >"$T/pgbench-$tool.log" 2>&1
    record lag "$tool" 1 load_end "$(now)"
    record lag "$tool" 1 tps "$(awk '/^tps/ {print $3; exit}' "$T/pgbench-$tool.log")"
    sleep "$DRAIN_SECS"
    touch "$stop"
    wait "$sampler"
    record lag "$tool" 1 samples "$T/lag-$tool.jsonl"
}

log "WAL lag: Strata streaming, pgbench -c $LAG_CLIENTS for $LAG_SECS s"
sql "ALTER SYSTEM SET archive_command = '/bin/true'" && sql "SELECT pg_reload_conf()" >/dev/null
sql "CHECKPOINT"
/usr/bin/time -v -o "$T/times/lag-strata-1.txt" "$STRATA" --config "$STRATA_CFG" wal receive bench \
    >"$T/receiver-lag.log" 2>&1 &
RECEIVER=$!
BG_PIDS=("$RECEIVER")
wait_for 30 "the WAL receiver" grep -qs "streaming WAL" "$T/receiver-lag.log"
lag_run strata
pkill -INT -P "$RECEIVER" || true # /usr/bin/time ignores SIGINT; its child does not
wait "$RECEIVER" || true
BG_PIDS=()
record lag strata 1 time_file "$T/times/lag-strata-1.txt"
sql "SELECT pg_drop_replication_slot('strata_bench')" >/dev/null

log "WAL lag: pgBackRest archive-push, pgbench -c $LAG_CLIENTS for $LAG_SECS s"
sql "ALTER SYSTEM RESET archive_command" && sql "SELECT pg_reload_conf()" >/dev/null
sql "CHECKPOINT"
SWITCH=$(sql "SELECT pg_switch_wal()")
wait_for 120 "pgBackRest to archive $SWITCH" pgbr_archived_past "$SWITCH"
: >"$T/times/archive-push.txt"
lag_run pgbackrest
record lag pgbackrest 1 push_times "$T/times/archive-push.txt"

# ---- PostgreSQL 17: backups that send only changed blocks --------------------
PG17BIN=${PG17BIN:-$ROOT/.cache/pg/17/bin}
if [ "$PG17" = 1 ] && [ ! -x "$PG17BIN/initdb" ] && [ "$INSTALL" = 1 ]; then
    log "installing the PostgreSQL 17 server (scripts/install-test-deps.sh --pg-server 17)"
    "$ROOT/scripts/install-test-deps.sh" --pg-server 17 >"$T/install-deps.log" 2>&1 || {
        tail -20 "$T/install-deps.log" >&2
        exit 1
    }
fi
if [ "$PG17" = 1 ] && [ -x "$PG17BIN/initdb" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m fast >/dev/null
    PORT=$(free_port)
    PGDATA17=$T/pgdata17
    log "PostgreSQL 17: initdb (port $PORT), same dataset"
    as_pg "$PG17BIN/initdb" -D "$PGDATA17" -A trust -U postgres >/dev/null
    server_conf "$PGDATA17" "summarize_wal = on"
    as_pg "$PG17BIN/pg_ctl" -D "$PGDATA17" -l "$T/pg17.log" -w start >/dev/null
    load_dataset
    record pg17 dataset 0 db_bytes "$(sql "SELECT sum(pg_database_size(oid)) FROM pg_database")"
    record pg17 dataset 0 version "$("$PG17BIN/postgres" --version)"
    for ((rep = 1; rep <= REPS; rep++)); do
        rm -rf "$T"/strata17-*
        cfg=$(strata_conf "$T/strata17-$rep")
        "$STRATA" --config "$cfg" instance add bench --host 127.0.0.1 --port "$PORT" --user postgres >/dev/null
        log "PostgreSQL 17, $rep/$REPS: full backup"
        timed full17 strata "$rep" -- "$STRATA" --config "$cfg" backup create bench >"$T/strata17.out" 2>"$T/strata-backup.log"
        record full17 strata "$rep" bytes "$(strata_repo_bytes "$T/strata17-$rep")"
        log "PostgreSQL 17, $rep/$REPS: changing 1 % of rows, then the next backup"
        change_one_percent "$rep"
        before=$(strata_repo_bytes "$T/strata17-$rep")
        timed incr17 strata "$rep" -- "$STRATA" --config "$cfg" backup create bench >"$T/strata17.out" 2>"$T/strata-backup.log"
        record incr17 strata "$rep" bytes "$(($(strata_repo_bytes "$T/strata17-$rep") - before))"
        id=$(tail -n1 "$T/strata17.out")
        "$STRATA" --config "$cfg" backup show bench "$id" --json >"$T/strata17-show.json"
        record incr17 strata "$rep" received "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["received_bytes"])' "$T/strata17-show.json")"
        record incr17 strata "$rep" incremental_from "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["incremental_from"])' "$T/strata17-show.json")"
        record incr17 strata "$rep" total "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["total_bytes"])' "$T/strata17-show.json")"
    done
    as_pg "$PG17BIN/pg_ctl" -D "$PGDATA17" stop -m fast >/dev/null
elif [ "$PG17" = 1 ]; then
    log "PostgreSQL 17 not found in $PG17BIN: its part is left out"
fi

# ---- report ------------------------------------------------------------------
record setup machine 0 load_end "$(cut -d' ' -f1 /proc/loadavg)"
log "writing the report"
python3 "$BENCH/report.py" --results "$RESULTS" --strata "$STRATA" --pgbin "$PGBIN" \
    --data-dir "$T" --size-gb "$SIZE_GB" --reps "$REPS" --lag-secs "$LAG_SECS" \
    --lag-clients "$LAG_CLIENTS" --drain-secs "$DRAIN_SECS" --relations "$RELATIONS" --note "${BENCH_NOTE:-}" ${OUT:+--out "$OUT"} $([ "$QUICK" = 1 ] && echo --quick)
