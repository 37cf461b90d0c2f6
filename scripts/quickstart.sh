#!/usr/bin/env bash
# Shows Strata's main job end to end on embedded defaults (./strata-data):
# starts a sandbox PostgreSQL 15 with sample data, registers it, takes a full
# backup, archives WAL while the sandbox takes writes, then restores the
# latest state into a new data directory, starts it and compares row counts.
# Everything it starts is stopped again; the repository stays in ./strata-data.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found in $PGBIN (apt-get install postgresql-15)" >&2; exit 1; }
cargo build --profile quickstart -p strata
STRATA=$PWD/target/quickstart/strata

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SANDBOX=$(mktemp -d /tmp/strata-quickstart-XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$SANDBOX"
PORT=$(free_port)
RESTORE_PORT=$(free_port)
ID="demo-$(date +%s)"
RECEIVER=""
cleanup() {
    [ -n "$RECEIVER" ] && kill -INT "$RECEIVER" 2>/dev/null && wait "$RECEIVER" 2>/dev/null || true
    as_pg "$PGBIN/pg_ctl" -D "$SANDBOX/restored" stop -m fast >/dev/null 2>&1 || true
    as_pg "$PGBIN/pg_ctl" -D "$SANDBOX/source" stop -m fast >/dev/null 2>&1 || true
    rm -rf "$SANDBOX"
}
trap cleanup EXIT

echo "== sandbox PostgreSQL on port $PORT"
as_pg "$PGBIN/initdb" -D "$SANDBOX/source" -A trust -U postgres >/dev/null
cat >> "$SANDBOX/source/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SANDBOX'
wal_level = replica
CONF
as_pg "$PGBIN/pg_ctl" -D "$SANDBOX/source" -l "$SANDBOX/source.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -q -s 10 postgres

echo "== strata instance add / backup create"
"$STRATA" instance add "$ID" --host 127.0.0.1 --port "$PORT" --user postgres
"$STRATA" backup create "$ID"

echo "== strata wal receive (while pgbench writes for 5 s)"
"$STRATA" wal receive "$ID" &
RECEIVER=$!
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n -T 5 postgres >/dev/null
sleep 2
kill -INT "$RECEIVER"; wait "$RECEIVER"; RECEIVER=""
"$STRATA" backup list "$ID"
"$STRATA" wal list "$ID"

echo "== strata restore (latest) to a new data directory, started on port $RESTORE_PORT"
"$STRATA" restore "$ID" --target-dir "$SANDBOX/restored" --start --port "$RESTORE_PORT"
q="SELECT (SELECT count(*) FROM pgbench_history) || ' history rows, balance sum ' || (SELECT sum(abalance) FROM pgbench_accounts)"
echo "source:   $(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -XAtc "$q" postgres)"
echo "restored: $(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$RESTORE_PORT" -U postgres -XAtc "$q" postgres)"
"$STRATA" repo verify
