#!/usr/bin/env bash
# Delta restore, side by side: `strata restore --delta` against a full
# `strata restore` into an empty directory and against
# `pgbackrest restore --delta`, on one PostgreSQL 15 dataset of about
# --size-gb GB (pgbench tables, random text, incompressible bytea).
#
# One backup is taken with each tool. The backup is restored and started,
# ~1 % of the rows of every table (a contiguous key range) are changed and
# the server is stopped: that directory is what each delta restore goes
# over. Each repetition runs the three restores in a rotating order
# (recovery to the backup's consistency point, files only: no start), then
# starts the restored directory, checks its tables against the backup's
# digest and changes the same 1 % again for the next delta run. Reported:
# wall time and bytes written (write_bytes of /proc/<pid>/io, counted for
# the whole process tree), medians over the repetitions, and the ratios
# delta/full. Results go to stdout as a table (and --out FILE as TSV).
#
#   bench/delta.sh [--size-gb N] [--reps N] [--dir DIR] [--strata-bin PATH]
#                  [--out FILE] [--keep]
#
# Run as root on Debian 12 with PostgreSQL 15 and pgbackrest installed.
# Clusters run as the `postgres` OS user, traffic stays on loopback, data
# lives under --dir (default /tmp/strata-bench-delta-XXXX) and everything
# started here is stopped (and the data removed) on exit.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
SIZE_GB=2
REPS=3
KEEP=0
OUT=""
STRATA=""
BASE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size-gb) SIZE_GB=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --dir) BASE=$2; shift 2 ;;
        --strata-bin) STRATA=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (clusters run as the postgres OS user)" >&2; exit 1; }
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found in $PGBIN" >&2; exit 1; }
command -v pgbackrest >/dev/null || { echo "pgbackrest is missing (apt-get install pgbackrest)" >&2; exit 1; }
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
if [ -z "$STRATA" ]; then
    log "building Strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata)
    STRATA=${CARGO_TARGET_DIR:-$ROOT/target}/release/strata
fi
[ -x "$STRATA" ] || { echo "no strata binary at $STRATA" >&2; exit 1; }

if [ -n "$BASE" ]; then
    mkdir -p "$BASE"
    T=$(mktemp -d "$BASE/strata-bench-delta-XXXXXX")
else
    T=$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-delta-XXXXXX")
fi
chmod 755 "$T"
mkdir -p "$T/sock"
chown postgres "$T" "$T/sock"
RESULTS=$T/results.tsv
: >"$RESULTS"
PORT=$(free_port)
RPORT=$(free_port)
PGDATA=$T/pgdata
DELTA_DIR=$T/delta
FULL_DIR=$T/full
PGBR_CONF=$T/pgbackrest.conf

cleanup() {
    set +e
    for d in "$DELTA_DIR" "$FULL_DIR" "$PGDATA"; do
        [ -f "$d/postmaster.pid" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1
    done
    if [ "$KEEP" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
# A step that fails (set -e) shows the logs of what it ran before they go.
on_error() {
    local rc=$?
    trap - ERR
    echo "bench: a step failed (exit $rc, line ${BASH_LINENO[0]}); the last lines of its logs:" >&2
    for f in "$T"/*.log "$DELTA_DIR"/log/*; do
        [ -f "$f" ] || continue
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
}
trap on_error ERR
trap cleanup EXIT
trap 'exit 130' INT TERM

rsql() { as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$RPORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }

# measured TOOL REP -- command...: wall seconds and bytes written by the
# command and every process below it (a reaped child's I/O counters are
# added to its parent's, so the parent's own counters before and after the
# wait tell the whole tree's).
measured() {
    local tool=$1 rep=$2
    shift 3
    read -r wall written < <(python3 - "$@" <<'PY'
import subprocess, sys, time
def written():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
w0, t0 = written(), time.monotonic()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
t1, w1 = time.monotonic(), written()
if r.returncode != 0:
    sys.exit(r.returncode)
print(f"{t1 - t0:.3f} {w1 - w0}")
PY
    )
    record "$tool" "$rep" wall "$wall"
    record "$tool" "$rep" write_bytes "$written"
    log "  $tool: ${wall} s, $((written / 1048576)) MiB written"
}

# ---- source cluster and dataset ----------------------------------------------
log "initdb in $T (port $PORT)"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
server_conf "$PGDATA" "archive_mode = on
archive_command = 'pgbackrest --config=$PGBR_CONF --stanza=bench archive-push %p'"
pgbr_write_conf "$PGBR_CONF" "$T/pgbr-repo"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$T/pg.log" -w start >/dev/null

mixed_dataset_plan "$SIZE_GB"
log "dataset: pgbench scale $SCALE, $TEXT_ROWS text rows, $BYTEA_ROWS bytea rows"
load_mixed_dataset
sql "VACUUM (FREEZE, ANALYZE)"
sql "CHECKPOINT"
DIGEST_SQL="SELECT (SELECT count(*) || ':' || sum(hashtext(a::text)) FROM pgbench_accounts a) || '/' || (SELECT count(*) || ':' || sum(hashtext(body)) FROM bench_text) || '/' || (SELECT count(*) || ':' || sum(hashtext(encode(data, 'hex'))) FROM bench_bytes)"
DIGEST=$(sql "$DIGEST_SQL")
DATA_BYTES=$(du -sb "$PGDATA" | cut -f1)
log "data directory: $((DATA_BYTES / 1048576)) MiB"
record setup 0 data_dir_bytes "$DATA_BYTES"

# ---- one backup with each tool -------------------------------------------------
STRATA_CFG=$T/strata.toml
printf 'data_dir = "%s"\n[restore]\nstart_timeout_secs = 600\n[postgres]\nbin_dirs = ["%s"]\n' "$T/strata" "$PGBIN" >"$STRATA_CFG"
"$STRATA" --config "$STRATA_CFG" instance add bench --host 127.0.0.1 --port "$PORT" --user postgres >/dev/null
log "backup: strata"
"$STRATA" --config "$STRATA_CFG" backup create bench >/dev/null 2>"$T/strata-backup.log"
log "backup: pgbackrest"
as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench stanza-create >/dev/null
as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench --type=full backup >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m fast >/dev/null

# ---- the directory delta restores go over --------------------------------------
# Starts the restored directory, checks it holds the backup's data, changes
# a contiguous 1 % of every table's rows and stops it.
verify_and_change() {
    as_pg "$PGBIN/pg_ctl" -D "$DELTA_DIR" -l "$T/delta-server.log" -w -t 600 \
        -o "-p $RPORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$T/sock -c archive_mode=off" start >/dev/null
    for _ in $(seq 600); do [ "$(rsql 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && break; sleep 0.2; done
    local got
    got=$(rsql "$DIGEST_SQL")
    [ "$got" = "$DIGEST" ] || { echo "restored data differs from the backup: $got vs $DIGEST" >&2; exit 1; }
    local acc=$((SCALE * 100000)) start=40
    rsql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid >= $((acc * start / 100)) AND aid < $((acc * start / 100 + acc / 100))"
    rsql "UPDATE bench_text SET body = $TEXT_EXPR WHERE id >= $((TEXT_ROWS * start / 100)) AND id < $((TEXT_ROWS * start / 100 + TEXT_ROWS / 100))"
    rsql "UPDATE bench_bytes SET data = gen_random_bytes(1000) WHERE id >= $((BYTEA_ROWS * start / 100)) AND id < $((BYTEA_ROWS * start / 100 + BYTEA_ROWS / 100))"
    as_pg "$PGBIN/pg_ctl" -D "$DELTA_DIR" stop -m fast -w -t 600 >/dev/null
}
log "first restore into $DELTA_DIR, then 1 % of rows changed"
"$STRATA" --config "$STRATA_CFG" restore bench --target-dir "$DELTA_DIR" --immediate >/dev/null 2>"$T/strata-restore.log"
verify_and_change

run_one() { # tool rep
    case $1 in
        strata_delta)
            measured strata_delta "$2" -- "$STRATA" --config "$STRATA_CFG" restore bench \
                --target-dir "$DELTA_DIR" --delta --immediate --json
            verify_and_change
            ;;
        pgbackrest_delta)
            measured pgbackrest_delta "$2" -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" \
                --stanza=bench --pg1-path="$DELTA_DIR" restore --delta --type=immediate --target-action=promote
            verify_and_change
            ;;
        strata_full)
            rm -rf "$FULL_DIR"
            sync
            measured strata_full "$2" -- "$STRATA" --config "$STRATA_CFG" restore bench \
                --target-dir "$FULL_DIR" --immediate --json
            rm -rf "$FULL_DIR"
            ;;
    esac
}
TOOLS=(strata_delta pgbackrest_delta strata_full)
for ((rep = 1; rep <= REPS; rep++)); do
    log "repetition $rep/$REPS (load $(cut -d' ' -f1-3 /proc/loadavg))"
    for ((i = 0; i < ${#TOOLS[@]}; i++)); do
        run_one "${TOOLS[$(((i + rep) % ${#TOOLS[@]}))]}" "$rep"
    done
done
record setup 0 load_end "$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,)"
[ -n "$OUT" ] && cp "$RESULTS" "$OUT"

python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
vals = {}
for tool, rep, metric, value in rows:
    vals.setdefault((tool, metric), []).append(value)
med = lambda t, m: statistics.median(float(v) for v in vals[(t, m)])
data = float(vals[("setup", "data_dir_bytes")][0])
print(f"data directory: {data / 2**20:.0f} MiB; load at the end: {vals[('setup', 'load_end')][0]}")
print(f"| restore | wall (median s) | written (median MiB) | wall / full | written / full |")
print(f"|---|---:|---:|---:|---:|")
fw, fb = med("strata_full", "wall"), med("strata_full", "write_bytes")
for tool in ("strata_full", "strata_delta", "pgbackrest_delta"):
    w, b = med(tool, "wall"), med(tool, "write_bytes")
    print(f"| {tool} | {w:.2f} | {b / 2**20:.1f} | {w / fw:.3f} | {b / fb:.4f} |")
PY
