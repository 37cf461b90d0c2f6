#!/usr/bin/env python3
"""Recovery events benchmark: what decoding them costs the WAL receiver, and
how long undoing a destructive transaction takes.

1. Decode cost. One PostgreSQL 15 cluster (pgbench scale --scale) saturated
   by pgbench (--clients connections, --secs seconds per run) while
   `strata wal receive` archives its WAL, once with `wal.recovery_events`
   on and once off, alternating for --rounds rounds. For each run: the
   receiver's CPU seconds (/proc/PID/stat utime + stime, from the moment it
   streams until it has stored everything pgbench wrote) and the WAL bytes it
   received; reported as CPU seconds per GiB of WAL, with the difference
   between on and off.
2. Undo. A table of --table-mb MiB, a full backup through the API, then one
   `DELETE` of all its rows. Times, from the moment
   `StrataDescribeRecoveryEvents` lists the event: `RestoreTable` with the
   event's `RestoreTargets.JustBefore` into the same instance under a new
   name, until the job finished; then checks the restored table's row count
   and digest against the ones taken just before the DELETE.

    bench/events.py [--scale 20] [--clients 4] [--secs 60] [--rounds 2]
                    [--table-mb 1024] [--skip-decode] [--skip-undo]
                    [--strata-bin PATH] [--out FILE]

Run as root with the test dependencies installed (the SDK lives in
.cache/venv; this script re-executes itself there). Builds Strata in
release mode unless --strata-bin is given. All traffic stays on 127.0.0.1;
everything started is stopped and removed on exit.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".cache" / "venv" / "bin" / "python"
PGBIN = pathlib.Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))

if pathlib.Path(sys.prefix).resolve() != (ROOT / ".cache" / "venv").resolve():
    if not VENV_PY.exists():
        subprocess.run([str(ROOT / "scripts" / "install-test-deps.sh")], check=True)
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])

sys.path.insert(0, str(ROOT / "bench"))
from fleet import Api  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def as_postgres(*cmd, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)], **kw)


def cpu_secs(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="strata-events-", dir="/var/tmp"))
        os.chmod(self.tmp, 0o755)
        self.data = self.tmp / "pg"
        self.port = 27432
        self.children = []

    def psql(self, sql, db="postgres"):
        r = as_postgres(PGBIN / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                        "-d", db, "-XAtqc", sql, capture_output=True, text=True, check=True)
        return r.stdout.strip()

    def start_cluster(self):
        self.data.mkdir()
        shutil.chown(self.data, "postgres", "postgres")
        as_postgres(PGBIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                    capture_output=True, check=True)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                "wal_level = replica\nmax_wal_senders = 8\nmax_replication_slots = 8\n"
                "shared_buffers = 256MB\nmax_wal_size = 4GB\ncheckpoint_timeout = 15min\n"
            )
        as_postgres(PGBIN / "pg_ctl", "-D", self.data, "-w", "-l", self.tmp / "pg.log", "start",
                    capture_output=True, check=True)
        log(f"loading pgbench scale {self.args.scale}")
        as_postgres(PGBIN / "pgbench", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-i",
                    "-q", "-s", self.args.scale, "postgres", capture_output=True, check=True)

    def strata(self, name, wal_extra=""):
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(
            f'data_dir = "{self.tmp / name}"\n[wal]\nflush_interval_ms = 200\n{wal_extra}'
            f'[server]\nlisten = "127.0.0.1:27400"\n'
        )
        return cfg

    def cli(self, cfg, *args, **kw):
        return subprocess.run([self.args.strata_bin, "--config", cfg, *map(str, args)],
                              capture_output=True, text=True, check=True, **kw)

    # ----- 1. decode cost -----

    def decode_run(self, events_on, round_no):
        name = f"{'on' if events_on else 'off'}{round_no}"
        cfg = self.strata(name, "" if events_on else "recovery_events = false\n")
        self.cli(cfg, "instance", "add", name, "--host", "127.0.0.1", "--port", self.port,
                 "--user", "postgres")
        proc = subprocess.Popen([self.args.strata_bin, "--config", cfg, "wal", "receive", name],
                                stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"{name}.log", "w"))
        self.children.append(proc)
        slot = f"strata_{name}"
        deadline = time.monotonic() + 60
        while self.psql(f"SELECT count(*) FROM pg_stat_replication WHERE application_name = 'strata'") == "0":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the receiver did not stream")
            time.sleep(0.2)
        start_lsn = parse_lsn(self.psql("SELECT pg_current_wal_insert_lsn()"))
        cpu0 = cpu_secs(proc.pid)
        as_postgres(PGBIN / "pgbench", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-n",
                    "-c", self.args.clients, "-j", max(1, self.args.clients // 2), "-T", self.args.secs,
                    "postgres", capture_output=True, check=True)
        end_lsn = parse_lsn(self.psql("SELECT pg_current_wal_insert_lsn()"))
        deadline = time.monotonic() + 300
        while True:
            flushed = self.psql(
                "SELECT coalesce(max(flush_lsn), '0/0') FROM pg_stat_replication WHERE application_name = 'strata'"
            )
            if parse_lsn(flushed) >= end_lsn:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the receiver fell behind")
            time.sleep(0.1)
        cpu = cpu_secs(proc.pid) - cpu0
        proc.terminate()
        proc.wait(timeout=60)
        # The walsender may outlive the receiver for a moment.
        for _ in range(100):
            if self.psql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active") == "0":
                break
            time.sleep(0.1)
        self.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        wal = end_lsn - start_lsn
        log(f"{name}: {cpu:.2f} CPU s for {wal / 2**20:.0f} MiB of WAL")
        return {"events": events_on, "round": round_no, "cpu_secs": cpu, "wal_bytes": wal,
                "cpu_per_gib": cpu / (wal / 2**30)}

    # ----- 2. undo -----

    def undo(self):
        cfg = self.strata("undo")
        key = json.loads(self.cli(cfg, "key", "create", "--json").stdout)
        server = subprocess.Popen([self.args.strata_bin, "--config", cfg, "serve"],
                                  stdout=open(self.tmp / "serve.log", "w"), stderr=subprocess.STDOUT,
                                  env=dict(os.environ, STRATA_LOG="warn"))
        self.children.append(server)
        api = Api(27400, key["AccessKeyId"], key["AccessKeySecret"])
        deadline = time.monotonic() + 30
        while True:
            try:
                api.call("DescribeDBInstances", PageSize=30)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        rows = self.args.table_mb * 2**20 // 250
        log(f"creating a {self.args.table_mb} MiB table ({rows} rows)")
        self.psql(f"CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 6) AS v FROM generate_series(1, {rows}) g")
        size = int(self.psql("SELECT pg_table_size('big')"))
        api.call("StrataRegisterDBInstance", DBInstanceId="undo", Host="127.0.0.1", Port=self.port,
                 User="postgres", SSLMode="disable")
        self.wait_jobs(api, "undo")
        before = self.psql("SELECT count(*) || ':' || md5(string_agg(md5(id::text || v), '' ORDER BY id)) FROM big")
        xid = self.psql("WITH d AS (DELETE FROM big RETURNING 1) SELECT txid_current()")
        deadline = time.monotonic() + 300
        while True:
            found = api.call("StrataDescribeRecoveryEvents", DBInstanceId="undo", TableName="big",
                             EventType="Delete")["Items"]["RecoveryEvent"]
            if found:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Delete event was not listed")
            time.sleep(0.2)
        event = found[0]
        assert event["Xid"] == xid, (event, xid)
        meta = json.dumps([{"type": "db", "name": "postgres",
                            "tables": [{"type": "table", "name": "public.big", "newname": "big_back"}]}])
        t0 = time.monotonic()
        job = api.call("RestoreTable", DBInstanceId="undo", TableMeta=meta,
                       **event["RestoreTargets"]["JustBefore"])["StrataJobId"]
        state = self.wait_job(api, "undo", job)
        secs = time.monotonic() - t0
        if state != "Finished":
            raise RuntimeError(f"RestoreTable ended {state}")
        after = self.psql("SELECT count(*) || ':' || md5(string_agg(md5(id::text || v), '' ORDER BY id)) FROM big_back")
        assert after == before, (after, before)
        log(f"undo of {size / 2**20:.0f} MiB: {secs:.1f} s")
        return {"table_bytes": size, "rows": rows, "undo_secs": secs}

    def wait_jobs(self, api, instance):
        deadline = time.monotonic() + 3600
        while True:
            jobs = api.call("DescribeBackupTasks", DBInstanceId=instance)["Items"]["BackupJob"]
            if jobs and all(j["BackupStatus"] in ("Finished", "Failed") for j in jobs):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("jobs did not finish")
            time.sleep(1)

    def wait_job(self, api, instance, job):
        deadline = time.monotonic() + 3600
        while True:
            jobs = api.call("DescribeBackupTasks", DBInstanceId=instance, BackupJobId=job)["Items"]["BackupJob"]
            if jobs and jobs[0]["BackupStatus"] in ("Finished", "Failed"):
                return jobs[0]["BackupStatus"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} did not finish")
            time.sleep(0.2)

    def close(self):
        for p in self.children:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        if (self.data / "postmaster.pid").exists():
            as_postgres(PGBIN / "pg_ctl", "-D", self.data, "-m", "immediate", "stop", capture_output=True)
        # Restored servers of the undo run live under Strata's data directory.
        for pid_file in self.tmp.glob("**/postmaster.pid"):
            as_postgres(PGBIN / "pg_ctl", "-D", pid_file.parent, "-m", "immediate", "stop", capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def report(decode, undo, args):
    lines = [f"Recovery events, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
             f"{os.cpu_count()} CPUs; pgbench scale {args.scale}, {args.clients} clients, {args.secs} s per run", ""]
    if decode:
        lines += ["| run | events | receiver CPU s | WAL MiB | CPU s per GiB |", "|---|---|---:|---:|---:|"]
        for r in decode:
            lines.append(f"| {r['round']} | {'on' if r['events'] else 'off'} | {r['cpu_secs']:.2f} | "
                         f"{r['wal_bytes'] / 2**20:.0f} | {r['cpu_per_gib']:.2f} |")
        on = statistics.median(r["cpu_per_gib"] for r in decode if r["events"])
        off = statistics.median(r["cpu_per_gib"] for r in decode if not r["events"])
        lines += ["", f"Median CPU s per GiB of WAL: on {on:.2f}, off {off:.2f} "
                      f"({(on / off - 1) * 100:+.1f} % with events on).", ""]
    if undo:
        lines += [f"Undo of a DELETE of a {undo['table_bytes'] / 2**20:.0f} MiB table ({undo['rows']} rows): "
                  f"RestoreTable just before it took {undo['undo_secs']:.1f} s; the restored table matched "
                  "the digest taken just before the DELETE."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--secs", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--table-mb", type=int, default=1024)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-undo", action="store_true")
    ap.add_argument("--strata-bin")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not args.strata_bin:
        subprocess.run(["cargo", "build", "--release", "-p", "strata"], cwd=ROOT, check=True)
        args.strata_bin = str(ROOT / "target" / "release" / "strata")
    bench = Bench(args)
    try:
        bench.start_cluster()
        decode = []
        if not args.skip_decode:
            for i in range(1, args.rounds + 1):
                # Alternate which goes first: the cluster warms up as it runs.
                for on in ([True, False] if i % 2 else [False, True]):
                    decode.append(bench.decode_run(on, i))
        undo = None if args.skip_undo else bench.undo()
    finally:
        bench.close()
    text = report(decode, undo, args)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
