#!/usr/bin/env python3
"""Snapshot backup benchmark: `strata agent` on a loop-mounted XFS (reflink=1).

For each dataset size (default 2 GB and 8 GB of databases), on a fresh file
system:

1. makes a sparse image file, `mkfs.xfs -m reflink=1`, mounts it (loop);
2. `initdb` a PostgreSQL 15 cluster on it as the `postgres` OS user and loads
   the dataset bench/run.sh uses (pgbench tables ~40 %, random hex text ~30 %,
   random 1000-byte bytea ~30 %; `VACUUM (FREEZE, ANALYZE)`, `CHECKPOINT`);
3. starts `strata agent` on the data directory (as root, on 127.0.0.1);
4. full rounds (--full-reps, alternating order), each into an empty
   repository of its own: `strata backup create ID` (a physical backup over
   the replication protocol), and `strata backup create ID --snapshot`
   followed by `strata backup upload ID SET` (the first upload: every byte read
   from the agent);
5. in the last snapshot repository, --reps more snapshot backups (wall time of
   the whole `strata backup create --snapshot` command), and the clone step:
   through the RDS API (`strata serve`, a V2-signed `CloneDBInstance` of a
   snapshot set, polled with `DescribeDBInstances` until the clone is Running
   and then until it answers SQL; see `measure_api_clone`), and the same steps
   through the agent's own API (see `measure_clone`);
6. --reps times: 1 % of the rows changed the way bench/run.sh changes them (a
   contiguous 1 % key range of every table, new row versions appended), a
   `CHECKPOINT`, a snapshot backup and its upload, which reads only the blocks
   the agent reports changed since the previous uploaded snapshot;
7. once: every 100th row of pgbench_accounts updated (1 % of its rows, spread
   over every page), the same snapshot and upload: the worst case for
   block-level change tracking; the table's extents (filefrag) are counted
   after the load, after the 1 % changes and after this one;
8. the agent's peak RSS (/proc/PID/status VmHWM), reset before each phase
   (/proc/PID/clear_refs) and read after it, and its highest value overall.

The clone step is timed as a client sees it, through `CloneDBInstance`, and
through the agent's signed API (docs/AGENT.md) alone, which leaves out the
Strata server's bookkeeping (the job, the catalog, the polling); each
agent-direct repetition also times a clone started with
`recovery_init_sync_method = syncfs`.

Bytes read by an upload: what Strata read from the agent (`received_bytes` of
the uploaded set), and what the agent process read in all (/proc/PID/io
`rchar`; `read_bytes` is what reached the block device below the page cache).

    bench/snapshot.py [--sizes 2,8] [--reps 3] [--full-reps 2] [--strata-bin PATH]
                      [--work-dir DIR] [--out FILE] [--json FILE] [--keep-going]

Run as root on Debian 12 with PostgreSQL 15 and xfsprogs. Builds Strata in
release mode unless --strata-bin is given. Everything lives in one directory
(default under /var/tmp) and is stopped, unmounted and removed on exit,
failures included. Prints a markdown table; --out writes it to a file too,
--json the raw figures.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import os
import pathlib
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PGBIN = pathlib.Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))
INSTANCE = "bench"

TEXT_EXPR = " || ' ' || ".join(["md5(random()::text)"] * 8)


def log(msg):
    print(f"{time.strftime('%H:%M:%S')}  {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, capture=True, **kw):
    out = subprocess.run(
        [str(c) for c in cmd],
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        **kw,
    )
    if check and out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout or ''}{out.stderr or ''}"
        )
    return out


def as_pg(cmd, **kw):
    return run(["runuser", "-u", "postgres", "--", *cmd], **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd, log_file):
    """Runs cmd; returns (wall seconds, stdout, stderr, rusage of that process).

    os.wait4 gives this one child's peak RSS and CPU time. Its stderr is appended to log_file."""
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    with open(log_file, "a") as f:
        f.write(stderr)
    if proc.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-20:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{stdout}{tail}")
    return wall, stdout, stderr, usage


def median(xs):
    return statistics.median(xs) if xs else None


def parse_lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def segment_name(timeline, lsn, seg_size=16 << 20):
    seg = lsn // seg_size
    per_id = 0x100000000 // seg_size
    return "%08X%08X%08X" % (timeline, seg // per_id, seg % per_id)


class Agent:
    """A running `strata agent`, and its signed HTTP API for the clone step."""

    def __init__(self, strata, data_dir, log_file):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key_file = data_dir.parent / "strata-snapshots" / "agent.key"
        self.log_file = log_file
        self.proc = subprocess.Popen(
            [str(strata), "agent", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=open(log_file, "w"),
        )
        deadline = time.monotonic() + 30
        while "strata agent serving" not in pathlib.Path(log_file).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not start:\n" + pathlib.Path(log_file).read_text())
            time.sleep(0.1)
        self.key = bytes.fromhex(self.key_file.read_text().strip())

    def proc_status(self, field):
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/{self.proc.pid}/status")

    def reset_peak(self):
        # "5" resets the peak resident set size (VmHWM) to the current one.
        pathlib.Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_rss(self):
        return self.proc_status("VmHWM")

    def io(self):
        fields = {}
        for line in pathlib.Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            k, v = line.split(":")
            fields[k] = int(v)
        return fields

    def call(self, method, path, body=None, timeout=300):
        data = json.dumps(body).encode() if body is not None else b""
        ts = str(int(time.time()))
        nonce = secrets.token_hex(16)
        body_hash = hashlib.sha256(data).hexdigest()
        text = f"STRATA-AGENT-HMAC-SHA256\n{method}\n{path}\n\n{ts}\n{nonce}\n{body_hash}"
        sig = hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()
        req = urllib.request.Request(self.url + path, data=data if body is not None else None, method=method)
        req.add_header("x-strata-timestamp", ts)
        req.add_header("x-strata-nonce", nonce)
        req.add_header("x-strata-content-sha256", body_hash)
        req.add_header("authorization", f"Strata-HMAC-SHA256 {sig}")
        if body is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"agent {method} {path}: {e.code} {e.read().decode(errors='replace')}")
        return json.loads(raw) if raw else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ApiServer:
    """`strata serve` over a Strata's catalog and repository, called with V2-signed requests
    (HMAC-SHA1, as scripts/rds-curl.sh and the SDKs with signature_algorithm='v2' sign)."""

    def __init__(self, strata, log_file):
        key = json.loads(strata.ok("key", "create", "--json"))
        self.key_id, self.secret = key["AccessKeyId"], key["AccessKeySecret"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(strata.binary), "--config", str(strata.config), "serve", "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=open(log_file, "a"),
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("strata serve did not start; see " + str(log_file))
            time.sleep(0.1)

    def call(self, action, **params):
        q = {
            "Action": action, "Version": "2014-08-15", "Format": "JSON", "AccessKeyId": self.key_id,
            "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0",
            "SignatureNonce": secrets.token_hex(16),
            "Timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **params,
        }

        def enc(v):
            return urllib.parse.quote(str(v), safe="-_.~")

        query = "&".join(sorted(f"{enc(k)}={enc(v)}" for k, v in q.items()))
        to_sign = "GET&%2F&" + enc(query)
        digest = hmac.new((self.secret + "&").encode(), to_sign.encode(), hashlib.sha1).digest()
        url = f"{self.url}/?{query}&Signature={enc(base64.b64encode(digest).decode())}"
        try:
            with urllib.request.urlopen(url, timeout=300) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{action}: {e.code} {e.read().decode(errors='replace')}")

    def instance(self, instance_id):
        items = self.call("DescribeDBInstances")["Items"]["DBInstance"]
        return next((i for i in items if i["DBInstanceId"] == instance_id), None)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Strata:
    """A `strata` CLI with its own configuration and local repository."""

    def __init__(self, binary, data_dir, log_file):
        self.binary = binary
        self.dir = data_dir
        self.dir.mkdir(parents=True)
        self.config = data_dir.parent / f"{data_dir.name}.toml"
        # keep_local high: every snapshot stays on the host, so each upload's
        # base is the one uploaded just before it.
        self.config.write_text(
            f'data_dir = "{data_dir}"\n[postgres]\nbin_dirs = ["{PGBIN}"]\n[snapshot]\nkeep_local = 100\n'
        )
        self.log_file = log_file

    def ok(self, *args):
        return run([self.binary, "--config", self.config, *args]).stdout

    def timed(self, *args):
        return timed([self.binary, "--config", self.config, *args], self.log_file)

    def backups(self):
        return json.loads(self.ok("backup", "list", INSTANCE, "--json"))

    def backup(self, set_id):
        return next(b for b in self.backups() if b["id"] == set_id)

    def show(self, set_id):
        return json.loads(self.ok("backup", "show", INSTANCE, set_id, "--json"))

    def repo_bytes(self):
        total = 0
        for sub in ("repo/packs", f"repo/instances/{INSTANCE}/backups"):
            for p in (self.dir / sub).rglob("*"):
                if p.is_file():
                    total += p.stat().st_size
        return total


class Cluster:
    """The PostgreSQL 15 cluster on the XFS, with bench/run.sh's dataset."""

    def __init__(self, data_dir, sock_dir, log_file):
        self.data = data_dir
        self.sock = sock_dir
        self.port = free_port()
        self.log_file = log_file
        log_file.touch()
        shutil.chown(log_file, "postgres")
        as_pg([PGBIN / "initdb", "-D", data_dir, "-A", "trust", "-U", "postgres"])
        with open(data_dir / "postgresql.conf", "a") as f:
            f.write(
                f"""
# written by bench/snapshot.py
port = {self.port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sock_dir}'
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
max_wal_size = 2GB
checkpoint_timeout = 30min
autovacuum = off
logging_collector = off
"""
            )
        self.start()

    def start(self):
        as_pg([PGBIN / "pg_ctl", "-D", self.data, "-l", self.log_file, "-w", "start"])

    def stop(self, mode="fast"):
        as_pg([PGBIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"], check=False)

    def sql(self, query):
        out = as_pg(
            [PGBIN / "psql", "-h", self.sock, "-p", self.port, "-U", "postgres", "-d", "postgres",
             "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query]
        )
        return out.stdout.strip()

    def load(self, size_gb):
        gb = size_gb * 2**30
        # bench/run.sh's proportions: pgbench ~15.5 MB per scale unit with
        # indexes, text rows ~340 bytes on disk, bytea rows ~1070 bytes.
        self.scale = max(1, round(gb * 0.4 / 15.5e6))
        self.text_rows = max(1000, int(gb * 0.3 / 340))
        self.bytea_rows = max(1000, int(gb * 0.3 / 1070))
        log(f"dataset: pgbench scale {self.scale}, {self.text_rows} text rows, {self.bytea_rows} bytea rows")
        as_pg([PGBIN / "pgbench", "-h", self.sock, "-p", self.port, "-U", "postgres", "-i", "-q",
               "-s", self.scale, "postgres"])
        self.sql("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        self.sql("CREATE TABLE bench_text (id bigint PRIMARY KEY, body text NOT NULL)")
        self.sql("CREATE TABLE bench_bytes (id bigint PRIMARY KEY, data bytea NOT NULL)")
        base = [PGBIN / "psql", "-h", self.sock, "-p", self.port, "-U", "postgres", "-d", "postgres",
                "-XAtq", "-v", "ON_ERROR_STOP=1", "-c"]
        loads = [
            subprocess.Popen(["runuser", "-u", "postgres", "--", *map(str, base),
                              f"INSERT INTO bench_text SELECT g, {TEXT_EXPR} FROM generate_series(1, {self.text_rows}) g"]),
            subprocess.Popen(["runuser", "-u", "postgres", "--", *map(str, base),
                              f"INSERT INTO bench_bytes SELECT g, gen_random_bytes(1000) FROM generate_series(1, {self.bytea_rows}) g"]),
        ]
        for p in loads:
            if p.wait() != 0:
                raise RuntimeError("loading the dataset failed")
        self.sql("VACUUM (FREEZE, ANALYZE)")
        self.sql("CHECKPOINT")

    def change_one_percent(self, rep):
        """bench/run.sh's change: a contiguous 1 % key range of every table."""
        acc = self.scale * 100000
        pct = (rep * 37) % 90 + 5
        for table, key, rows, expr in (
            ("pgbench_accounts", "aid", acc, None),
            ("bench_text", "id", self.text_rows, f"body = {TEXT_EXPR}"),
            ("bench_bytes", "id", self.bytea_rows, "data = gen_random_bytes(1000)"),
        ):
            lo = rows * pct // 100
            hi = lo + rows // 100
            setting = expr or "abalance = abalance + 1"
            self.sql(f"UPDATE {table} SET {setting} WHERE {key} >= {lo} AND {key} < {hi}")
        self.sql("CHECKPOINT")

    def accounts_extents(self):
        """Extents of pgbench_accounts' files (all 1 GB segments), as FIEMAP reports them."""
        rel = self.data / self.sql("SELECT pg_relation_filepath('pgbench_accounts')")
        total = 0
        for f in [rel, *sorted(rel.parent.glob(rel.name + ".*"))]:
            if re.fullmatch(r"\d+(\.\d+)?", f.name):
                out = run(["filefrag", f]).stdout
                total += int(re.search(r"(\d+) extents? found", out).group(1))
        return total

    def change_scattered(self):
        """Every 100th row of pgbench_accounts: 1 % of its rows, on every page."""
        self.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 100 = 7")
        self.sql("CHECKPOINT")


class LoopXfs:
    """A sparse image file, made XFS with reflink and loop-mounted."""

    def __init__(self, image, mount, size_bytes):
        self.image = image
        self.mount = mount
        self.mounted = False
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        run(["mkfs.xfs", "-q", "-m", "reflink=1", image])
        mount.mkdir()
        run(["mount", "-o", "loop", image, mount])
        self.mounted = True
        shutil.chown(mount, "postgres", "postgres")

    def unmount(self):
        if self.mounted:
            for _ in range(10):
                if run(["umount", self.mount], check=False).returncode == 0:
                    self.mounted = False
                    break
                time.sleep(1)
        if not self.mounted and self.image.exists():
            self.image.unlink()


def startup_sync_secs(server_log):
    """Seconds between a clone server's "was interrupted" line and its next line: PostgreSQL
    syncs every file of a data directory that was not shut down cleanly before recovery
    (recovery_init_sync_method, src/backend/access/transam/xlog.c)."""
    stamps = []
    for line in server_log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC", line)
        if m:
            stamps.append((datetime.datetime.fromisoformat(m.group(1)), line))
    for (t, line), (t_next, _) in zip(stamps, stamps[1:]):
        if "database system was interrupted" in line:
            return (t_next - t).total_seconds()
    return None


def measure_api_clone(api, cluster, set_id, reps, timeout=600):
    """`CloneDBInstance` of a snapshot set still on the database host, as a client sees it:
    from sending the signed request until `DescribeDBInstances` lists the clone Running, and
    until it answers SQL with the snapshot's rows. The clone must be the agent's (made on the
    host, `StrataAgentClone`), not a restore from the repository. Each clone is deleted with
    `DeleteDBInstance` before the next."""
    results = []
    for rep in range(1, reps + 1):
        t0 = time.monotonic()
        clone = api.call("CloneDBInstance", DBInstanceId=INSTANCE, BackupId=set_id)["DBInstanceId"]
        t_answered = time.monotonic()
        while True:
            item = api.instance(clone)
            status = item["DBInstanceStatus"] if item else "not listed"
            if status == "Running":
                break
            if status == "Failed" or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"clone {clone} of set {set_id}: {status}: {item}")
            time.sleep(0.05)
        t_running = time.monotonic()
        if item.get("StrataAgentClone") != clone:
            raise RuntimeError(f"clone {clone} was not made on the database host: {item}")
        query = [PGBIN / "psql", "-h", "127.0.0.1", "-p", item["Port"], "-U", "postgres", "-d", "postgres",
                 "-XAtq", "-c", "SELECT count(*) FROM pgbench_branches"]
        while True:
            out = as_pg(query, check=False)
            if out.returncode == 0:
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"clone {clone} does not answer SQL: {out.stderr}")
            time.sleep(0.05)
        t_sql = time.monotonic()
        if out.stdout.strip() != str(cluster.scale):
            raise RuntimeError(f"clone {clone} has {out.stdout.strip()} pgbench_branches rows, not {cluster.scale}")
        api.call("DeleteDBInstance", DBInstanceId=clone)
        log(f"CloneDBInstance {clone}: answers SQL after {t_sql - t0:.2f} s "
            f"(request {t_answered - t0:.2f} s, Running after {t_running - t0:.2f} s)")
        results.append({"request_secs": t_answered - t0, "running_secs": t_running - t0,
                        "sql_secs": t_sql - t0})
    return results


def measure_clone(agent, strata, cluster, set_id, name, reps):
    """Clone from a snapshot set to a server accepting connections, through the agent alone.

    The steps a clone from a snapshot set takes on the database host, called on the agent's own
    API: the set's WAL (start to stop segment) reflinked from the live pg_wal into the snapshot,
    the snapshot reflinked into a clone directory, and a PostgreSQL server started on it,
    recovering to the backup's consistency point and promoted (the agent answers once it
    accepts connections). `measure_api_clone` times the same through `CloneDBInstance`, with
    the Strata server's bookkeeping around these calls. Each repetition also times a second
    clone whose postgresql.conf gets `recovery_init_sync_method = syncfs` first (the agent
    does not set it today)."""
    s = strata.backup(set_id)
    tli = int(s["start_timeline"])
    first = segment_name(tli, parse_lsn(s["start_lsn"]))
    last = segment_name(tli, parse_lsn(s["stop_lsn"]) - 1)
    t0 = time.monotonic()
    agent.call("POST", f"/v1/snapshots/{set_id}/wal", {"first": first, "last": last})
    wal_secs = time.monotonic() - t0

    def one_clone(clone, syncfs):
        port = free_port()
        t0 = time.monotonic()
        created = agent.call("POST", f"/v1/clones/{clone}", {"snapshot": set_id})
        t1 = time.monotonic()
        if syncfs:
            # What Strata's restore gives a restored server's first start: one syncfs() of the
            # file system instead of an fsync() of every file before recovery.
            with open(pathlib.Path(created["path"], "postgresql.conf"), "a") as f:
                f.write("recovery_init_sync_method = syncfs\n")
        started = agent.call(
            "POST",
            f"/v1/clones/{clone}/start",
            {"port": port, "listen_addresses": "127.0.0.1", "target": {"kind": "immediate"},
             "stay_in_recovery": False},
        )
        t2 = time.monotonic()
        # Proof it serves the data: the row count of a table as of the snapshot.
        rows = as_pg([PGBIN / "psql", "-h", started["socket_dir"], "-p", port, "-U", "postgres",
                      "-d", "postgres", "-XAtq", "-c", "SELECT count(*) FROM pgbench_branches"]).stdout.strip()
        if rows != str(cluster.scale):
            raise RuntimeError(f"clone {clone} has {rows} pgbench_branches rows, not {cluster.scale}")
        server_log = pathlib.Path(created["path"], "strata-server.log").read_text(errors="replace")
        agent.call("DELETE", f"/v1/clones/{clone}")
        log(f"clone {clone}{' (syncfs)' if syncfs else ''}: {t2 - t0:.2f} s "
            f"(reflink {t1 - t0:.2f} s, start {t2 - t1:.2f} s)")
        return {"clone_secs": t1 - t0, "start_secs": t2 - t1, "total_secs": t2 - t0,
                "agent_start_ms": started.get("elapsed_ms"), "server_log": server_log,
                "startup_sync_secs": startup_sync_secs(server_log)}

    # Alternating, so both see the same load.
    results, with_syncfs = [], []
    for rep in range(1, reps + 1):
        results.append(one_clone(f"{name}-{rep}", False))
        with_syncfs.append(one_clone(f"{name}-syncfs-{rep}", True))
    return {"wal_secs": wal_secs, "segments": [first, last], "reps": results, "reps_syncfs": with_syncfs}


def snapshot_backup(strata, agent):
    """`strata backup create ID --snapshot`: wall, set id, the agent's peak RSS."""
    agent.reset_peak()
    wall, out, err, usage = strata.timed("backup", "create", INSTANCE, "--snapshot")
    # The agent's own time for the reflink walk, as the command reports it.
    walk = re.findall(r"snapshot of \d+ files \(\d+ bytes\) in (\d+) ms", err)
    return {"wall": wall, "id": out.strip().splitlines()[-1], "agent_peak": agent.peak_rss(),
            "cli_peak": usage.ru_maxrss * 1024, "reflink_secs": int(walk[-1]) / 1000 if walk else None}


def upload(strata, agent, set_id):
    """`strata backup upload ID SET`: wall, bytes read, CPU, peak RSS of both processes."""
    agent.reset_peak()
    io0 = agent.io()
    wall, out, _, usage = strata.timed("backup", "upload", INSTANCE, set_id)
    io1 = agent.io()
    show = strata.show(set_id)
    return {
        "wall": wall,
        "line": out.strip().splitlines()[0],
        "read_from_agent": show.get("received_bytes"),
        "total_bytes": show.get("total_bytes"),
        "agent_rchar": io1["rchar"] - io0["rchar"],
        "agent_disk_read": io1["read_bytes"] - io0["read_bytes"],
        "agent_peak": agent.peak_rss(),
        "cli_peak": usage.ru_maxrss * 1024,
        "cli_cpu": usage.ru_utime + usage.ru_stime,
    }


def physical_backup(strata):
    wall, out, _, usage = strata.timed("backup", "create", INSTANCE)
    return {"wall": wall, "id": out.strip().splitlines()[-1], "cli_peak": usage.ru_maxrss * 1024,
            "cli_cpu": usage.ru_utime + usage.ru_stime, "stored": strata.repo_bytes()}


def dir_bytes(path):
    return int(run(["du", "-sb", path]).stdout.split()[0])


def bench_size(args, strata_bin, work, size_gb):
    """The whole run for one dataset size; returns its figures."""
    r = {"size_gb": size_gb, "load_start": os.getloadavg()[0]}
    tag = f"{size_gb:g}g".replace(".", "_")
    image = work / f"xfs-{tag}.img"
    fs = LoopXfs(image, work / f"mnt-{tag}", int((size_gb * 3 + 8) * 2**30))
    cleanups = [fs.unmount]
    try:
        sock = fs.mount / "sock"
        sock.mkdir()
        shutil.chown(sock, "postgres", "postgres")
        log(f"{size_gb:g} GB: initdb on {fs.mount}")
        pg = Cluster(fs.mount / "pgdata", sock, work / f"pg-{tag}.log")
        cleanups.insert(0, lambda: pg.stop("immediate"))
        t0 = time.monotonic()
        pg.load(size_gb)
        r["load_secs"] = time.monotonic() - t0
        r["db_bytes"] = int(pg.sql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
        r["data_dir_bytes"] = dir_bytes(pg.data)
        r["scale"], r["text_rows"], r["bytea_rows"] = pg.scale, pg.text_rows, pg.bytea_rows
        log(f"{size_gb:g} GB: dataset ready in {r['load_secs']:.0f} s: databases {r['db_bytes'] >> 20} MiB, "
            f"data directory {r['data_dir_bytes'] >> 20} MiB")

        r["extents_loaded"] = pg.accounts_extents()
        agent = Agent(strata_bin, pg.data, work / f"agent-{tag}.log")
        cleanups.insert(0, agent.stop)
        r["agent_rss_idle"] = agent.proc_status("VmRSS")

        def strata_for(name, with_agent):
            s = Strata(strata_bin, work / f"strata-{tag}-{name}", work / f"strata-{tag}.log")
            add = ["instance", "add", INSTANCE, "--host", "127.0.0.1", "--port", str(pg.port), "--user", "postgres"]
            if with_agent:
                add += ["--agent", agent.url, "--agent-key-file", str(agent.key_file)]
            s.ok(*add)
            return s

        # Full rounds: each into an empty repository, alternating which goes first.
        r["physical"], r["first_snapshot"], r["first_upload"] = [], [], []
        snap = None
        for rep in range(1, args.full_reps + 1):
            order = ["physical", "snapshot"] if rep % 2 else ["snapshot", "physical"]
            for kind in order:
                log(f"{size_gb:g} GB: full round {rep}/{args.full_reps}: {kind}")
                if kind == "physical":
                    s = strata_for(f"physical-{rep}", False)
                    r["physical"].append(physical_backup(s))
                    shutil.rmtree(s.dir)
                else:
                    if snap is not None:
                        shutil.rmtree(snap.dir)
                    snap = strata_for(f"snapshot-{rep}", True)
                    first = snapshot_backup(snap, agent)
                    r["first_snapshot"].append(first)
                    up = upload(snap, agent, first["id"])
                    up["stored"] = snap.repo_bytes()
                    r["first_upload"].append(up)
                    log(f"{size_gb:g} GB: {up['line']}")

        # More snapshot backups (cheap), then the clone step from the last one.
        r["snapshots"] = list(r["first_snapshot"])
        for rep in range(1, args.reps + 1):
            s = snapshot_backup(snap, agent)
            r["snapshots"].append(s)
            log(f"{size_gb:g} GB: snapshot backup {rep}/{args.reps}: {s['wall']:.2f} s")
        agent.reset_peak()
        try:
            r["clone"] = measure_clone(agent, snap, pg, r["snapshots"][-1]["id"], f"clone-{tag}", args.reps)
        except RuntimeError as e:
            if not args.keep_going:
                raise
            log(f"clone step failed, left out: {e}")
            r["clone"] = None
        r["clone_agent_peak"] = agent.peak_rss()
        # The same through the RDS API, from a snapshot set of its own.
        api_set = snapshot_backup(snap, agent)["id"]
        api = ApiServer(snap, work / f"serve-{tag}.log")
        try:
            r["api_clone"] = measure_api_clone(api, pg, api_set, args.reps)
        except RuntimeError as e:
            if not args.keep_going:
                raise
            log(f"CloneDBInstance step failed, left out: {e}")
            r["api_clone"] = None
        finally:
            api.stop()

        # Uploads after a 1 % change, each against the snapshot uploaded before it.
        r["incremental"] = []
        for rep in range(1, args.reps + 1):
            log(f"{size_gb:g} GB: 1 % change {rep}/{args.reps}")
            pg.change_one_percent(rep)
            s = snapshot_backup(snap, agent)
            up = upload(snap, agent, s["id"])
            up["snapshot_wall"] = s["wall"]
            up["snapshot_agent_peak"] = s["agent_peak"]
            r["incremental"].append(up)
            log(f"{size_gb:g} GB: {up['line']}")
        r["extents_changed"] = pg.accounts_extents()
        log(f"{size_gb:g} GB: 1 % of pgbench_accounts rows, every 100th")
        pg.change_scattered()
        r["extents_scattered"] = pg.accounts_extents()
        s = snapshot_backup(snap, agent)
        up = upload(snap, agent, s["id"])
        up["snapshot_wall"] = s["wall"]
        up["snapshot_reflink"] = s["reflink_secs"]
        r["scattered"] = up
        log(f"{size_gb:g} GB: {up['line']}")
        r["load_end"] = os.getloadavg()[0]
        return r
    finally:
        for c in cleanups:
            try:
                c()
            except Exception as e:  # cleanup goes on whatever failed
                log(f"cleanup: {e}")


def mib(n):
    return f"{n / 2**20:,.0f}" if n is not None else "—"


def secs(x):
    return f"{x:.2f}" if x is not None else "—"


def summarize(r):
    """One column of the report: medians and maxima of a size's figures."""
    first = r["first_upload"]
    inc = r["incremental"]
    c = {}
    c["dataset"] = f"{mib(r['db_bytes'])} MiB ({mib(r['data_dir_bytes'])} MiB data directory)"
    c["snapshot_wall"] = median([s["wall"] for s in r["snapshots"]])
    c["snapshot_wall_range"] = (min(s["wall"] for s in r["snapshots"]), max(s["wall"] for s in r["snapshots"]))
    c["snapshot_n"] = len(r["snapshots"])
    c["snapshot_reflink"] = median([s["reflink_secs"] for s in r["snapshots"] if s["reflink_secs"] is not None])
    clone = r.get("clone")
    if clone:
        c["clone_total"] = median([x["total_secs"] for x in clone["reps"]])
        c["clone_reflink"] = median([x["clone_secs"] for x in clone["reps"]])
        c["clone_start"] = median([x["start_secs"] for x in clone["reps"]])
        c["clone_wal"] = clone["wal_secs"]
        c["clone_sync"] = median([x["startup_sync_secs"] for x in clone["reps"] if x["startup_sync_secs"] is not None])
        c["clone_n"] = len(clone["reps"])
        c["clone_syncfs"] = median([x["total_secs"] for x in clone["reps_syncfs"]])
        c["clone_syncfs_sync"] = median([x["startup_sync_secs"] for x in clone["reps_syncfs"]
                                         if x["startup_sync_secs"] is not None])
    api_clone = r.get("api_clone")
    if api_clone:
        c["api_clone_sql"] = median([x["sql_secs"] for x in api_clone])
        c["api_clone_running"] = median([x["running_secs"] for x in api_clone])
        c["api_clone_request"] = median([x["request_secs"] for x in api_clone])
        c["api_clone_n"] = len(api_clone)
    c["physical_wall"] = median([p["wall"] for p in r["physical"]])
    c["physical_cpu"] = median([p["cli_cpu"] for p in r["physical"]])
    c["physical_stored"] = median([p["stored"] for p in r["physical"]])
    c["physical_peak"] = max(p["cli_peak"] for p in r["physical"])
    c["first_wall"] = median([u["wall"] for u in first])
    c["first_snap_plus_upload"] = median([u["wall"] + s["wall"] for u, s in zip(first, r["first_snapshot"])])
    c["first_cpu"] = median([u["cli_cpu"] for u in first])
    c["first_read"] = median([u["read_from_agent"] for u in first])
    c["first_disk"] = median([u["agent_disk_read"] for u in first])
    c["first_stored"] = median([u["stored"] for u in first])
    c["first_cli_peak"] = max(u["cli_peak"] for u in first)
    c["inc_wall"] = median([u["wall"] for u in inc])
    c["inc_cpu"] = median([u["cli_cpu"] for u in inc])
    c["inc_read"] = median([u["read_from_agent"] for u in inc])
    c["inc_snapshot_wall"] = median([u["snapshot_wall"] for u in inc])
    c["inc_time_ratio"] = c["inc_wall"] / c["first_wall"]
    c["inc_read_ratio"] = c["inc_read"] / c["first_read"]
    sc = r["scattered"]
    c["sc_wall"], c["sc_read"] = sc["wall"], sc["read_from_agent"]
    c["sc_snapshot_wall"] = sc["snapshot_wall"]
    c["sc_snapshot_reflink"] = sc.get("snapshot_reflink")
    c["sc_cpu"] = sc["cli_cpu"]
    c["inc_cli_peak"] = max(u["cli_peak"] for u in inc)
    c["sc_cli_peak"] = sc["cli_peak"]
    c["extents"] = (r["extents_loaded"], r["extents_changed"], r["extents_scattered"])
    c["sc_time_ratio"] = sc["wall"] / c["first_wall"]
    c["sc_read_ratio"] = sc["read_from_agent"] / c["first_read"]
    peaks = {
        "snapshot": max(s["agent_peak"] for s in r["snapshots"]),
        "clone": r.get("clone_agent_peak"),
        "first upload": max(u["agent_peak"] for u in first),
        "upload after 1 % change": max(u["agent_peak"] for u in inc + [sc]),
    }
    c["agent_peaks"] = peaks
    c["agent_peak"] = max(v for v in peaks.values() if v is not None)
    c["agent_idle"] = r["agent_rss_idle"]
    c["load"] = (r["load_start"], r["load_end"])
    return c


def report(results, args, strata_bin):
    cols = [summarize(r) for r in results]
    heads = [f"{r['size_gb']:g} GB" for r in results]
    lines = []
    add = lines.append
    add("| measure | " + " | ".join(heads) + " |")
    add("|---|" + "---|" * len(heads))

    def row(label, fn):
        add(f"| {label} | " + " | ".join(fn(c) for c in cols) + " |")

    row("databases (data directory)", lambda c: c["dataset"])
    row("snapshot backup, wall s (median; min–max)",
        lambda c: f"{secs(c['snapshot_wall'])} ({secs(c['snapshot_wall_range'][0])}–{secs(c['snapshot_wall_range'][1])}, n={c['snapshot_n']})")
    row("  of which: the agent's reflink walk, s (median)", lambda c: secs(c["snapshot_reflink"]))
    row("CloneDBInstance of a snapshot set until the clone answers SQL, s",
        lambda c: f"{secs(c['api_clone_sql'])} (n={c['api_clone_n']})" if "api_clone_sql" in c else "not measured")
    row("  of which: until the request is answered / until listed Running",
        lambda c: f"{secs(c.get('api_clone_request'))} / {secs(c.get('api_clone_running'))}")
    row("clone through the agent's API alone, to accepting connections, s",
        lambda c: f"{secs(c['clone_total'])} (n={c['clone_n']})" if "clone_total" in c else "not measured")
    row("  of which: reflink of the snapshot / server start", lambda c: f"{secs(c.get('clone_reflink'))} / {secs(c.get('clone_start'))}")
    row("  of the start: PostgreSQL syncing every file before recovery", lambda c: secs(c.get("clone_sync")))
    row("  the same with recovery_init_sync_method = syncfs in the clone: total / sync, s",
        lambda c: f"{secs(c.get('clone_syncfs'))} / {secs(c.get('clone_syncfs_sync'))}")
    row("  the set's WAL reflinked into the snapshot (once), s", lambda c: secs(c.get("clone_wal")))
    row("`strata backup create` (physical), wall s", lambda c: secs(c["physical_wall"]))
    row("first snapshot upload, wall s", lambda c: secs(c["first_wall"]))
    row("first snapshot backup + its upload, wall s", lambda c: secs(c["first_snap_plus_upload"]))
    row("first upload ÷ physical backup, wall", lambda c: f"{c['first_wall'] / c['physical_wall']:.2f}×")
    row("physical backup / first upload, CPU s (strata process)", lambda c: f"{secs(c['physical_cpu'])} / {secs(c['first_cpu'])}")
    row("physical backup / first upload, stored MiB", lambda c: f"{mib(c['physical_stored'])} / {mib(c['first_stored'])}")
    row("first upload, read from the agent MiB (from disk below the page cache)",
        lambda c: f"{mib(c['first_read'])} ({mib(c['first_disk'])})")
    row("upload after 1 % change, wall s", lambda c: secs(c["inc_wall"]))
    row("upload after 1 % change, read from the agent MiB", lambda c: mib(c["inc_read"]))
    row("upload after 1 % change ÷ first upload: time / bytes read",
        lambda c: f"{c['inc_time_ratio']:.3f}× / {c['inc_read_ratio']:.3f}×")
    row("snapshot backup after 1 % change, wall s", lambda c: secs(c["inc_snapshot_wall"]))
    row("upload after every 100th pgbench_accounts row changed: s / MiB read",
        lambda c: f"{secs(c['sc_wall'])} / {mib(c['sc_read'])}")
    row("  ÷ first upload: time / bytes read", lambda c: f"{c['sc_time_ratio']:.2f}× / {c['sc_read_ratio']:.2f}×")
    row("  its upload's CPU s (strata process)", lambda c: secs(c["sc_cpu"]))
    row("  the snapshot backup before it, wall s (the agent's reflink walk)",
        lambda c: f"{secs(c['sc_snapshot_wall'])} ({secs(c['sc_snapshot_reflink'])})")
    row("pgbench_accounts extents: loaded / after the 1 % changes / after every 100th row",
        lambda c: " / ".join(f"{n:,}" for n in c["extents"]))
    row("agent peak RSS MiB (VmHWM), highest phase", lambda c: f"{c['agent_peak'] / 2**20:.1f}")
    row("  snapshot / clone / first upload / later uploads",
        lambda c: " / ".join(f"{v / 2**20:.1f}" if v else "—" for v in c["agent_peaks"].values()))
    row("agent RSS at rest after start, MiB", lambda c: f"{c['agent_idle'] / 2**20:.1f}")
    row("strata peak RSS MiB: physical backup / first upload",
        lambda c: f"{c['physical_peak'] / 2**20:.1f} / {c['first_cli_peak'] / 2**20:.1f}")
    row("strata peak RSS MiB: uploads after 1 % change / after every 100th row",
        lambda c: f"{c['inc_cli_peak'] / 2**20:.1f} / {c['sc_cli_peak'] / 2**20:.1f}")
    row("load average (1 min) at start / end", lambda c: f"{c['load'][0]:.2f} / {c['load'][1]:.2f}")
    table = "\n".join(lines)
    facts = machine_facts(strata_bin)
    text = (
        f"Command: `bench/snapshot.py --sizes {args.sizes} --reps {args.reps} --full-reps {args.full_reps}`\n\n"
        + table
        + "\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in facts.items())
        + "\n"
    )
    return text, cols, facts


def machine_facts(strata_bin):
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(open("/proc/meminfo").readline().split()[1]) * 1024
    osname = "?"
    for line in open("/etc/os-release"):
        if line.startswith("PRETTY_NAME="):
            osname = line.split("=", 1)[1].strip().strip('"')
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": f"{mem / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "OS": osname,
        "PostgreSQL": run([PGBIN / "postgres", "--version"]).stdout.strip(),
        "xfsprogs": run(["mkfs.xfs", "-V"]).stdout.strip(),
        "Strata": run([strata_bin, "--version"]).stdout.strip()
        + " (commit " + run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).stdout.strip() + ")",
        "image file on": run(["df", "--output=source,fstype", "/var/tmp"]).stdout.splitlines()[-1].strip(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2,8", help="dataset sizes in GB, comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="snapshots, clones and 1 %% change rounds")
    ap.add_argument("--full-reps", type=int, default=2, help="physical backups and first uploads")
    ap.add_argument("--strata-bin", type=pathlib.Path)
    ap.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("/var/tmp"))
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--keep-going", action="store_true", help="report the rest when the clone step fails")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (mount, losetup; clusters run as the postgres OS user)")
    if not (PGBIN / "initdb").exists():
        sys.exit(f"PostgreSQL 15 not found in {PGBIN} (apt-get install postgresql-15)")
    if shutil.which("mkfs.xfs") is None:
        sys.exit("mkfs.xfs not found (apt-get install xfsprogs)")
    sizes = [float(s) for s in args.sizes.split(",")]
    strata_bin = args.strata_bin
    if strata_bin is None:
        log("building Strata (release)")
        run(["cargo", "build", "--release", "-q", "-p", "strata"], cwd=ROOT, capture=False)
        strata_bin = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "strata"
    strata_bin = strata_bin.resolve()

    # Space: the image holds the data directory (databases, WAL up to
    # max_wal_size, new row versions) and each repository about half the data.
    need = max(sizes) * 2**30 * 4.5 + 4 * 2**30
    free = shutil.disk_usage(args.work_dir).free
    if free < need:
        sys.exit(f"{args.work_dir} has {free >> 30} GiB free; the {max(sizes):g} GB run needs about {int(need) >> 30} GiB")

    work = pathlib.Path(tempfile.mkdtemp(prefix="strata-snapbench-", dir=args.work_dir))
    work.chmod(0o755)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    try:
        for size in sizes:
            results.append(bench_size(args, strata_bin, work, size))
    except BaseException:
        for f in sorted(work.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-20:]
            print(f"--- {f.name}\n" + "\n".join(lines), file=sys.stderr)
        raise
    finally:
        if args.json and results:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    text, _, _ = report(results, args, strata_bin)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
