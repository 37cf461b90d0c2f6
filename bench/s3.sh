#!/usr/bin/env bash
# Backups and restores to an S3 repository against the same to a local
# directory: one PostgreSQL 15 server, the mixed dataset of bench/run.sh
# (pgbench tables, random text, incompressible bytea), a real S3 server
# (s3s-fs) on loopback. Each repetition runs `strata backup create` into an
# empty local repository and into an empty S3 prefix, alternating which goes
# first; then `strata restore --immediate` (files and the backup's WAL, no
# server start) from each, alternating too. Prints wall time, CPU seconds and
# peak RSS (medians) and the S3/local ratios.
#
#   bench/s3.sh [--size-gb N] [--reps N] [--strata-bin PATH] [--dir DIR] [--keep]
#               [--s3-set KEY=VALUE]...
#
# --s3-set adds a key to the [s3] table of the S3 run's configuration (e.g.
# --s3-set upload_concurrency=1 to measure one pack in flight).
#
# Run as root with PostgreSQL 15 installed and s3s-fs built
# (scripts/install-test-deps.sh puts it in .cache/s3s/bin; STRATA_S3S_FS
# names another). Everything lives in one directory (default
# /work/bench-s3, or a temporary one when /work is absent), which is
# removed on exit unless --keep; every process started here is stopped.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
S3S_FS=${STRATA_S3S_FS:-$ROOT/.cache/s3s/bin/s3s-fs}

SIZE_GB=1
REPS=3
KEEP=0
STRATA=""
DIR=""
S3_EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --size-gb) SIZE_GB=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --strata-bin) STRATA=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --s3-set) S3_EXTRA+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || { echo "run as root (the cluster runs as the postgres OS user)" >&2; exit 1; }
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found in $PGBIN" >&2; exit 1; }
[ -x "$S3S_FS" ] || { echo "s3s-fs not found at $S3S_FS (scripts/install-test-deps.sh)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is missing (apt-get install time)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

if [ -z "$STRATA" ]; then
    log "building Strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata)
    STRATA=${CARGO_TARGET_DIR:-$ROOT/target}/release/strata
fi
[ -x "$STRATA" ] || { echo "no strata binary at $STRATA" >&2; exit 1; }

# ---- sandbox -----------------------------------------------------------------
if [ -z "$DIR" ]; then
    if [ -d /work ]; then DIR=/work/bench-s3; else DIR=$(mktemp -d /tmp/strata-bench-s3-XXXXXX); fi
fi
if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    echo "$DIR is not empty; remove it or pass --dir" >&2
    exit 1
fi
T=$DIR
mkdir -p "$T/sock" "$T/times" "$T/s3/data"
chmod 755 "$T"
chown postgres "$T" "$T/sock"
RESULTS=$T/results.tsv
: >"$RESULTS"

PORT=$(free_port)
S3_PORT=$(free_port)
PGDATA=$T/pgdata
S3_PID=""

cleanup() {
    trap - ERR
    set +e
    [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate >/dev/null 2>&1
    if [ "$KEEP" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
on_error() {
    local rc=$?
    trap - ERR
    echo "bench: a step failed (exit $rc); the last lines of its logs:" >&2
    for f in "$T"/*.log; do
        [ -f "$f" ] || continue
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
}
trap on_error ERR
trap cleanup EXIT
trap 'exit 130' INT TERM

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"; }

# CPU seconds the S3 server has used so far (user + system).
server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$S3_PID/stat"; }

# timed PHASE TARGET REP -- command...: wall clock, CPU and peak RSS, and
# the CPU the S3 server spent meanwhile.
timed() {
    local phase=$1 target=$2 rep=$3
    shift 4
    local tf="$T/times/$phase-$target-$rep.txt" t0 t1 c0 c1
    c0=$(server_cpu)
    t0=$(now)
    /usr/bin/time -v -o "$tf" "$@"
    t1=$(now)
    c1=$(server_cpu)
    record "$phase" "$target" "$rep" server_cpu "$(elapsed "$c0" "$c1")"
    record "$phase" "$target" "$rep" wall "$(elapsed "$t0" "$t1")"
    record "$phase" "$target" "$rep" cpu "$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$tf")"
    record "$phase" "$target" "$rep" rss_kb "$(awk -F': ' '/Maximum resident/ {print $2}' "$tf")"
}

# ---- source cluster and dataset (as bench/run.sh) ----------------------------
log "initdb in $T (port $PORT)"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
server_conf "$PGDATA"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$T/pg.log" -w start >/dev/null

mixed_dataset_plan "$SIZE_GB"
log "dataset: pgbench scale $SCALE, $TEXT_ROWS text rows, $BYTEA_ROWS bytea rows"
load_mixed_dataset
sql "VACUUM (FREEZE, ANALYZE)"
sql "CHECKPOINT"
DATA_BYTES=$(dir_bytes "$PGDATA")
log "data directory $((DATA_BYTES / 1048576)) MiB"

# ---- S3 server -----------------------------------------------------------------
BUCKET=strata-bench
ACCESS=bench-access
SECRET=bench-secret-key-0123456789
mkdir -p "$T/s3/data/$BUCKET"
RUST_LOG=warn "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$ACCESS" \
    --secret-key "$SECRET" "$T/s3/data" >"$T/s3s-fs.log" 2>&1 &
S3_PID=$!
for _ in $(seq 200); do
    (echo >"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break
    sleep 0.05
done
log "s3s-fs on 127.0.0.1:$S3_PORT (pid $S3_PID)"

# ---- configurations ------------------------------------------------------------
conf() { # target rep -> config file; a fresh, empty repository each time
    local target=$1 rep=$2 dir=$T/strata-$1
    rm -rf "$dir" "$T/s3/data/$BUCKET/$target"
    mkdir -p "$dir"
    printf 'data_dir = "%s"\n' "$dir" >"$dir.toml"
    if [ "$target" = s3 ]; then
        cat >>"$dir.toml" <<CONF
repository = "s3://$BUCKET/s3"
[s3]
endpoint = "http://127.0.0.1:$S3_PORT"
path_style = true
allow_http = true
access_key_id = "$ACCESS"
secret_access_key = "$SECRET"
CONF
        for kv in "${S3_EXTRA[@]}"; do printf '%s\n' "$kv" >>"$dir.toml"; done
    fi
    echo "$dir.toml"
}
repo_bytes() { # target
    case $1 in
        local) dir_bytes "$T/strata-local/repo" ;;
        s3) dir_bytes "$T/s3/data/$BUCKET/s3" ;;
    esac
}

backup_run() { # target rep
    local cfg
    cfg=$(conf "$1" "$2")
    "$STRATA" --config "$cfg" instance add bench --host 127.0.0.1 --port "$PORT" --user postgres --sslmode disable >/dev/null 2>&1
    timed backup "$1" "$2" -- "$STRATA" --config "$cfg" backup create bench >/dev/null 2>"$T/backup-$1.log"
    record backup "$1" "$2" bytes "$(repo_bytes "$1")"
}
restore_run() { # target rep
    local dir=$T/restore-$1
    rm -rf "$dir"
    timed restore "$1" "$2" -- "$STRATA" --config "$T/strata-$1.toml" restore bench \
        --target-dir "$dir" --immediate >/dev/null 2>"$T/restore-$1.log"
    record restore "$1" "$2" bytes "$(dir_bytes "$dir")"
    rm -rf "$dir"
}

record setup machine 0 load_start "$(cut -d' ' -f1 /proc/loadavg)"
for ((rep = 1; rep <= REPS; rep++)); do
    order=(local s3)
    [ $((rep % 2)) = 0 ] && order=(s3 local)
    for target in "${order[@]}"; do
        log "backup $rep/$REPS: $target"
        backup_run "$target" "$rep"
    done
done
# The repositories of the last repetition stay; restore from each in turn.
for ((rep = 1; rep <= REPS; rep++)); do
    order=(local s3)
    [ $((rep % 2)) = 0 ] && order=(s3 local)
    for target in "${order[@]}"; do
        log "restore $rep/$REPS: $target"
        restore_run "$target" "$rep"
    done
done
record setup machine 0 load_end "$(cut -d' ' -f1 /proc/loadavg)"

# ---- report --------------------------------------------------------------------
python3 - "$RESULTS" "$DATA_BYTES" "$REPS" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
setup = {}
for line in open(sys.argv[1]):
    phase, target, rep, key, value = line.rstrip("\n").split("\t")
    if phase == "setup":
        setup[key] = value
    else:
        rows[(phase, target, key)].append(float(value))
med = lambda p, t, k: statistics.median(rows[(p, t, k)])
print(f"data directory {int(sys.argv[2]) / 2**20:.0f} MiB, {sys.argv[3]} repetitions, "
      f"load average {setup['load_start']} -> {setup['load_end']}")
print(f"{'':8} {'target':6} {'wall s':>8} {'cpu s':>8} {'rss MiB':>8} {'s3s-fs cpu s':>13} {'walls':>20}")
for phase in ("backup", "restore"):
    for target in ("local", "s3"):
        walls = " ".join(f"{w:.1f}" for w in rows[(phase, target, "wall")])
        print(f"{phase:8} {target:6} {med(phase, target, 'wall'):8.2f} {med(phase, target, 'cpu'):8.2f} "
              f"{med(phase, target, 'rss_kb') / 1024:8.0f} {med(phase, target, 'server_cpu'):13.2f} {walls:>20}")
    ratio = med(phase, "s3", "wall") / med(phase, "local", "wall")
    print(f"{phase}: S3 / local wall time {ratio:.2f}x, "
          f"peak RSS S3 {max(rows[(phase, 's3', 'rss_kb')]) / 1024:.0f} MiB")
print(f"repository bytes: local {med('backup', 'local', 'bytes') / 2**20:.0f} MiB, "
      f"S3 {med('backup', 's3', 'bytes') / 2**20:.0f} MiB")
PY
