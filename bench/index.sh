#!/usr/bin/env bash
# Block index benchmark: what a small backup costs as the repository grows.
#
# Takes real backups of one small PostgreSQL 15 cluster (pgbench, --scale) into
# repositories that already hold:
#   - 1, 30 and 300 earlier backup sets of the same database (--sets): one
#     real backup, then copies of its manifest stored as older sets
#     (`strata repo bench-fill --copies`, the sets of an unchanged database);
#   - a synthetic 1 TB: --blocks distinct blocks (default 8 million, 1 TB at
#     128 KiB) with random hashes in empty packs of 512 blocks (16 MB packs of
#     blocks compressed to a quarter), listed by 64
#     synthetic sets of 125 000 blocks each and by one index run covering
#     them (`strata repo bench-fill --blocks`); nothing of the terabyte is
#     stored but the references.
# In each repository it alternates backups by the build under test ("after",
# the persisted block index) and by an older build ("before", --before-bin:
# every manifest read into memory at the start of each backup), --reps each,
# and reports medians of the backup's wall time, its block index set-up and
# its peak RSS (/usr/bin/time -v). Set-up is the time the backup spends
# before it can deduplicate: from its `BASE_BACKUP started` log line to its
# `blocks known` line (both builds log both; see setup_ms). Each
# backup adds a set, so a repository holds up to 2 x --reps more sets than
# named by the end; a "before" backup writes no index run, so the next
# "after" backup reads that one manifest.
#
#   bench/index.sh --before-bin PATH [--strata-bin PATH] [--blocks N] [--sets 1,30,300]
#                  [--reps N] [--scale N] [--work-dir DIR] [--keep]
#
# Run as root with PostgreSQL 15 installed; builds Strata in release mode
# unless --strata-bin is given. The cluster runs as the `postgres` OS user on
# loopback; everything lives under --work-dir (default /var/tmp) and is
# stopped and removed on exit unless --keep.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BLOCKS=8000000
SETS=1,30,300
REPS=3
SCALE=3
WORK=/var/tmp
KEEP=0
STRATA=""
BEFORE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --blocks) BLOCKS=$2; shift 2 ;;
        --sets) SETS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --scale) SCALE=$2; shift 2 ;;
        --work-dir) WORK=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --strata-bin) STRATA=$2; shift 2 ;;
        --before-bin) BEFORE=$2; shift 2 ;;
        -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$BEFORE" ] && [ -x "$BEFORE" ] || { echo "--before-bin: an earlier strata build is required" >&2; exit 2; }
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found in $PGBIN" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is required (apt-get install time)" >&2; exit 1; }
if [ -z "$STRATA" ]; then
    (cd "$ROOT" && cargo build --release -p strata >&2)
    STRATA=$ROOT/target/release/strata
fi

T=$(mktemp -d "$WORK/strata-bench-index.XXXXXX")
chmod 755 "$T"
PGDATA=$T/pgdata
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate >/dev/null 2>&1 || true
    if [ "$KEEP" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT
log() { echo "[$(date +%T)] $*" >&2; }

log "initdb in $T (port $PORT), pgbench scale $SCALE"
mkdir -p "$PGDATA" "$T/pglog" && chown postgres "$PGDATA" "$T/pglog"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
cat >>"$PGDATA/postgresql.conf" <<EOF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$T/pglog'
max_wal_senders = 10
wal_level = replica
EOF
echo "host replication all 127.0.0.1/32 trust" >>"$PGDATA/pg_hba.conf"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$T/pglog/pg.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1

RESULTS=$T/results.tsv
: >"$RESULTS"

# Milliseconds between two log lines' RFC 3339 timestamps.
ms_between() {
    python3 - "$1" "$2" <<'EOF'
import sys, datetime
a, b = (datetime.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in sys.argv[1:3])
print(round((b - a).total_seconds() * 1000))
EOF
}

# Set-up of the block index of one backup: from the stream's start to the
# moment the backup knows which blocks are stored (both builds log both).
setup_ms() { # log
    local first last
    first=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -m1 'BASE_BACKUP started' | awk '{print $1}')
    last=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -m1 'blocks known' | awk '{print $1}')
    if [ -n "$first" ] && [ -n "$last" ]; then ms_between "$first" "$last"; else echo NA; fi
}

measure() { # scenario mode config
    local scenario=$1 mode=$2 cfg=$3 bin tf=$T/time.txt lg=$T/backup.log
    bin=$([ "$mode" = after ] && echo "$STRATA" || echo "$BEFORE")
    STRATA_LOG=strata_repo=info,strata_engine=debug \
        /usr/bin/time -v -o "$tf" "$bin" --config "$cfg" backup create bench >/dev/null 2>"$lg"
    local rss wall setup
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,p,":"); s=0; for(i=1;i<=n;i++) s=s*60+p[i]; print s}' "$tf")
    setup=$(setup_ms "$lg")
    printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$mode" "$wall" "$setup" "$rss" >>"$RESULTS"
    log "  $scenario $mode: wall ${wall}s, set-up ${setup} ms, peak RSS $((rss / 1024)) MiB (load $(cut -d' ' -f1 /proc/loadavg))"
}

repository() { # name -> config file, with the instance registered and one backup
    local dir=$T/$1
    mkdir -p "$dir"
    printf 'data_dir = "%s"\n' "$dir" >"$dir.toml"
    "$STRATA" --config "$dir.toml" instance add bench --host 127.0.0.1 --port "$PORT" --user postgres >/dev/null
    "$STRATA" --config "$dir.toml" backup create bench >/dev/null 2>&1
    echo "$dir.toml"
}

alternate() { # scenario config
    for rep in $(seq "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then
            measure "$1" after "$2"; measure "$1" before "$2"
        else
            measure "$1" before "$2"; measure "$1" after "$2"
        fi
    done
}

IFS=, read -ra SET_COUNTS <<<"$SETS"
for n in "${SET_COUNTS[@]}"; do
    log "$n earlier set(s)"
    cfg=$(repository "sets-$n")
    [ "$n" -gt 1 ] && "$STRATA" --config "$cfg" repo bench-fill bench --copies $((n - 1)) >/dev/null
    alternate "$n sets" "$cfg"
    rm -rf "$T/sets-$n"
done

if [ "$BLOCKS" -gt 0 ]; then
    log "synthetic index of $BLOCKS blocks"
    cfg=$(repository synthetic)
    /usr/bin/time -v -o "$T/fill.txt" "$STRATA" --config "$cfg" repo bench-fill bench --blocks "$BLOCKS" --manifests 64 --blocks-per-pack 512 >&2
    log "  filled in $(awk -F': ' '/Elapsed/ {print $2}' "$T/fill.txt"), repository $(du -sh "$T/synthetic/repo" | cut -f1)"
    # The first backup on a host without the cache fetches and decodes every run once.
    rm -rf "$T/synthetic/index-cache"
    measure "$BLOCKS blocks, cold cache" after "$cfg"
    alternate "$BLOCKS blocks" "$cfg"
fi

python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
scenarios = list(dict.fromkeys(r[0] for r in rows))
def med(values):
    values = [float(v) for v in values if v not in ("", "NA")]
    return statistics.median(values) if values else float("nan")
print("| repository | build | backups | wall (s) | index set-up (ms) | peak RSS (MiB) |")
print("|---|---|---:|---:|---:|---:|")
for s in scenarios:
    for mode in ("before", "after"):
        sel = [r for r in rows if r[0] == s and r[1] == mode]
        if not sel:
            continue
        print(f"| {s} | {mode} | {len(sel)} | {med(r[2] for r in sel):.2f} | "
              f"{med(r[3] for r in sel):.0f} | {med(r[4] for r in sel) / 1024:.0f} |")
EOF
