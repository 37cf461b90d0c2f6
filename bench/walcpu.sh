#!/usr/bin/env bash
# CPU cost of continuous WAL archiving, side by side: Strata's `wal receive`
# (streaming from its slot, recovery events on) against pgBackRest's
# `archive-push` run by `archive_command`, over the same saturating pgbench
# load on one PostgreSQL 15 server. The tools alternate, once each per
# repetition; prints per run CPU seconds (Strata: the receiver's user +
# system time; pgBackRest: the sum over its archive-push calls), context
# switches (voluntary and involuntary, summed the same way), peak RSS,
# pgbench tps and the WAL lag figures of bench/run.sh's section 5, then the
# medians and the ratio.
#
#   bench/walcpu.sh [--secs N] [--reps N] [--scale N] [--clients N]
#                   [--strata-bin PATH] [--baseline PATH] [--perf DIR] [--keep]
#
# --baseline PATH: another Strata binary (e.g. one built from an earlier
# commit), run as a third tool "baseline" in each repetition.
#
# --perf DIR: one more Strata run with `perf record` attached to the
# receiver during the load; writes DIR/strata.perf and a flat profile
# DIR/strata.txt (its CPU figure is left out of the medians).
#
# Run as root on Debian 12 with PostgreSQL 15 and pgbackrest installed.
# Clusters run as the `postgres` OS user; all data lives under one temporary
# directory, all traffic stays on loopback, and everything started here is
# stopped on exit.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
SECS=60
REPS=3
SCALE=10
CLIENTS=8
DRAIN_SECS=5
STRATA=""
PERF_DIR=""
BASELINE=""
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --secs) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --scale) SCALE=$2; shift 2 ;;
        --clients) CLIENTS=$2; shift 2 ;;
        --strata-bin) STRATA=$2; shift 2 ;;
        --baseline) BASELINE=$2; shift 2 ;;
        --perf) PERF_DIR=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (clusters run as the postgres OS user)" >&2; exit 1; }
for t in pgbackrest /usr/bin/time python3 "$PGBIN/initdb"; do
    command -v "$t" >/dev/null || { echo "$t is missing" >&2; exit 1; }
done
[ -z "$PERF_DIR" ] || command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"
if [ -z "$STRATA" ]; then
    log "building Strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata)
    STRATA=${CARGO_TARGET_DIR:-$ROOT/target}/release/strata
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/strata-walcpu-XXXXXX")
chmod 755 "$T"
mkdir -p "$T/sock" "$T/times"
chown postgres "$T" "$T/sock" "$T/times"
PORT=$(free_port)
PGDATA=$T/pgdata
PGBR_CONF=$T/pgbackrest.conf
RESULTS=$T/results.jsonl
BG_PIDS=()
cleanup() {
    set +e
    for pid in "${BG_PIDS[@]}"; do
        pkill -INT -P "$pid" 2>/dev/null # /usr/bin/time ignores SIGINT; its child does not
        kill -INT "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate >/dev/null 2>&1
    if [ "$KEEP" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


log "initdb in $T (port $PORT), pgbench scale $SCALE"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
cat >"$T/archive-push.sh" <<SH
#!/bin/sh
exec /usr/bin/time -a -o "\$(cat $T/push-times)" -f "%e %U %S %M %w %c" \
    pgbackrest --config="$PGBR_CONF" --stanza=bench archive-push "\$1"
SH
chmod 755 "$T/archive-push.sh"
echo /dev/null >"$T/push-times"
server_conf "$PGDATA" "archive_mode = on
archive_command = '/bin/true'"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$T/pg.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -h "$T/sock" -p "$PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
sql "CHECKPOINT"
pgbr_write_conf "$PGBR_CONF" "$T/pgbr-repo"
as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench stanza-create >/dev/null

set_archive_command() {
    sql "ALTER SYSTEM SET archive_command = '$1'" && sql "SELECT pg_reload_conf()" >/dev/null
}
pgbr_archived_past() { # lsn
    python3 - "$1" "$(sql "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")" <<'PY'
import sys
f = lambda s: (int(s.split("/")[0], 16) << 32) + int(s.split("/")[1], 16)
n = sys.argv[2]
sys.exit(0 if len(n) == 24 and (int(n[8:16], 16) * 256 + int(n[16:24], 16) + 1) * 2**24 >= f(sys.argv[1]) else 1)
PY
}

# load TOOL RUN STRATA_CONFIG: pgbench with the lag sampler; records the run.
load() {
    local tool=$1 run=$2 cfg=${3:-} stop=$T/$1-$2.stop t0 t1
    python3 "$BENCH/lag.py" --tool "${tool/baseline/strata}" --psql "$PGBIN/psql" --host "$T/sock" --port "$PORT" \
        --strata "$STRATA" --strata-config "${cfg:-none}" --instance bench \
        --stop-file "$stop" --out "$T/lag-$tool-$run.jsonl" &
    local sampler=$!
    BG_PIDS+=("$sampler")
    sleep 1
    t0=$(now)
    as_pg "$PGBIN/pgbench" -h "$T/sock" -p "$PORT" -U postgres -n -c "$CLIENTS" -j 2 -T "$SECS" postgres \
        >"$T/pgbench-$tool-$run.log" 2>&1
    t1=$(now)
    sleep "$DRAIN_SECS"
    touch "$stop"
    wait "$sampler"
    unset 'BG_PIDS[-1]'
    printf '{"tool": "%s", "run": "%s", "load_start": %s, "load_end": %s, "tps": %s, "samples": "%s"}\n' \
        "$tool" "$run" "$t0" "$t1" "$(awk '/^tps/ {print $3; exit}' "$T/pgbench-$tool-$run.log")" \
        "$T/lag-$tool-$run.jsonl" >>"$T/runs-$tool-$run.json"
}

strata_run() { # run [perf [binary label]]
    local run=$1 perf=${2:-} STRATA=${3:-$STRATA} label=${4:-strata}
    local dir=$T/$label-$1
    mkdir -p "$dir"
    printf 'data_dir = "%s"\n' "$dir" >"$dir.toml"
    "$STRATA" --config "$dir.toml" instance add bench --host 127.0.0.1 --port "$PORT" --user postgres >/dev/null 2>&1
    # A backup first, as in bench/run.sh: the receiver then knows the names.
    "$STRATA" --config "$dir.toml" backup create bench >/dev/null 2>"$T/strata-backup.log"
    set_archive_command /bin/true
    sql "CHECKPOINT"
    /usr/bin/time -v -o "$T/times/$label-$run.txt" "$STRATA" --config "$dir.toml" wal receive bench \
        >"$T/receiver-$label-$run.log" 2>&1 &
    local receiver=$!
    BG_PIDS+=("$receiver")
    wait_for 30 "the WAL receiver" grep -qs "streaming WAL" "$T/receiver-$label-$run.log"
    local perf_pid=""
    if [ -n "$perf" ]; then
        perf record -F 999 --call-graph dwarf,32768 -o "$PERF_DIR/strata.perf" \
            -p "$(pgrep -P "$receiver")" >"$T/perf.log" 2>&1 &
        perf_pid=$!
    fi
    load "$label" "$run" "$dir.toml"
    [ -z "$perf_pid" ] || { kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" || true; }
    pkill -INT -P "$receiver" || true
    wait "$receiver" || true
    unset 'BG_PIDS[-1]'
    sql "SELECT pg_drop_replication_slot('strata_bench')" >/dev/null
    python3 - "$T/runs-$label-$run.json" "$T/times/$label-$run.txt" <<'PY' >>"$RESULTS"
import json, re, sys
r = json.loads(open(sys.argv[1]).read())
text = open(sys.argv[2]).read()
num = lambda l: float(re.search(re.escape(l) + r":\s*([0-9.]+)", text).group(1))
r["cpu"] = num("User time (seconds)") + num("System time (seconds)")
r["rss_mib"] = num("Maximum resident set size (kbytes)") / 1024
r["switches"] = num("Voluntary context switches") + num("Involuntary context switches")
print(json.dumps(r))
PY
    rm -rf "$dir" "$dir.toml"
}

baseline_run() { strata_run "$1" "" "$BASELINE" baseline; }

pgbackrest_run() { # run
    local run=$1 switch
    set_archive_command "$T/archive-push.sh %p"
    sql "CHECKPOINT"
    switch=$(sql "SELECT pg_switch_wal()")
    wait_for 120 "pgBackRest to archive $switch" pgbr_archived_past "$switch"
    : >"$T/times/push-$run.txt"
    chown postgres "$T/times/push-$run.txt"
    echo "$T/times/push-$run.txt" >"$T/push-times"
    load pgbackrest "$run"
    echo /dev/null >"$T/push-times"
    set_archive_command /bin/true
    python3 - "$T/runs-pgbackrest-$run.json" "$T/times/push-$run.txt" <<'PY' >>"$RESULTS"
import json, re, sys
r = json.loads(open(sys.argv[1]).read())
calls = [l.split() for l in open(sys.argv[2]) if re.match(r"^[0-9.]+ ", l)]
r["cpu"] = sum(float(c[1]) + float(c[2]) for c in calls)
r["rss_mib"] = max((float(c[3]) for c in calls), default=0) / 1024
r["calls"] = len(calls)
r["switches"] = sum(float(c[4]) + float(c[5]) for c in calls if len(c) >= 6)
print(json.dumps(r))
PY
}

LOAD_START=$(cut -d' ' -f1 /proc/loadavg)
for ((rep = 1; rep <= REPS; rep++)); do
    order=(strata pgbackrest)
    [ -z "$BASELINE" ] || order+=(baseline)
    n=${#order[@]}
    order=("${order[@]:$((rep % n))}" "${order[@]:0:$((rep % n))}")
    for tool in "${order[@]}"; do
        log "run $rep/$REPS: $tool, pgbench -c $CLIENTS -j 2 -T $SECS"
        "${tool}_run" "$rep"
    done
done
if [ -n "$PERF_DIR" ]; then
    mkdir -p "$PERF_DIR"
    log "profiling the receiver: pgbench -c $CLIENTS -j 2 -T $SECS under perf record"
    strata_run perf perf
    perf report -i "$PERF_DIR/strata.perf" --no-children --sort dso,symbol --stdio 2>/dev/null |
        grep -v '^$' | head -400 >"$PERF_DIR/strata.txt" || true
fi

python3 - "$RESULTS" "$LOAD_START" "$(cut -d' ' -f1 /proc/loadavg)" "$BENCH" <<'PY'
import json, statistics, sys
sys.path.insert(0, sys.argv[4])
from report import lag_stats
runs = [json.loads(l) for l in open(sys.argv[1])]
print(f"load average {sys.argv[2]} before, {sys.argv[3]} after")
print("| tool | run | CPU s | context switches | peak RSS MiB | tps | WAL MiB/s | lag p50 s | p99 s | max s | first quarter MiB | last quarter MiB | after load MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
cpu = {}
for r in runs:
    s = lag_stats(r["samples"], r["load_start"], r["load_end"])
    if r["run"] != "perf":
        cpu.setdefault(r["tool"], []).append(r["cpu"])
    print(f"| {r['tool']} | {r['run']} | {r['cpu']:.2f} | {r.get('switches', 0):.0f} | {r['rss_mib']:.1f} | {r['tps']:.0f} | {s['wal_mb_s']:.1f} "
          f"| {s['p50_s']:.2f} | {s['p99_s']:.2f} | {s['max_s']:.2f} | {s['first_q_mb']:.1f} | {s['last_q_mb']:.1f} | {s['after_mb']:.1f} |")
med = {t: statistics.median(v) for t, v in cpu.items()}
for t, m in med.items():
    print(f"median CPU s, {t}: {m:.2f}")
for t in ("strata", "baseline"):
    if t in med and med.get("pgbackrest"):
        print(f"{t} / pgBackRest CPU: {med[t] / med['pgbackrest']:.2f}x")
PY
