#!/usr/bin/env python3
"""Fleet benchmark: what one Strata node costs per PostgreSQL instance.

Starts PostgreSQL 15 clusters (copies of one small pgbench database, each on
its own port, as the `postgres` OS user) and one `strata serve` on a SQLite
catalog and a local repository. Registers the clusters through the API in
steps (by default 10, then 25, then 50), log backup on, and at each step runs
pgbench at a fixed rate on every cluster for a measured window while sampling:

- the Strata process's resident memory and CPU seconds (/proc),
- WAL lag per instance: `flush_lag` of Strata's walsender in
  `pg_stat_replication` (the time between the server flushing WAL and Strata
  reporting it stored),
- API latency: `DescribeDBInstances` and `DescribeBackups` through the
  official SDK, one call at a time.

Then fits memory and CPU linearly in the number of instances and says how
many instances a node of this size holds under the load used. The clusters
and pgbench run on the same machine and their CPU is not Strata's; it is
reported apart.

    bench/fleet.py [--counts 10,25,50] [--secs 60] [--rate 5] [--strata-bin PATH]
                   [--out FILE] [--keep]

Run as root with the test dependencies installed (scripts/install-test-deps.sh:
the SDK lives in .cache/venv; this script re-executes itself there). All
traffic stays on 127.0.0.1; everything started is stopped on exit.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".cache" / "venv" / "bin" / "python"
PGBIN = pathlib.Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))
API_VERSION = "2014-08-15"

if pathlib.Path(sys.prefix).resolve() != (ROOT / ".cache" / "venv").resolve():
    if not VENV_PY.exists():
        subprocess.run([str(ROOT / "scripts" / "install-test-deps.sh")], check=True)
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])

from alibabacloud_rds20140815.client import Client  # noqa: E402
from alibabacloud_tea_openapi.models import Config  # noqa: E402
from alibabacloud_tea_openapi.utils_models import OpenApiRequest, Params  # noqa: E402
from darabonba.runtime import RuntimeOptions  # noqa: E402


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def as_postgres(*cmd, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)], **kw)


def psql(port, sql):
    r = as_postgres(
        PGBIN / "psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "postgres",
        "-XAtqc", sql, capture_output=True, text=True, check=True,
    )
    return r.stdout.strip()


def percentile(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, round(p / 100 * (len(v) - 1))))
    return v[k]


def linear_fit(xs, ys):
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


class Api:
    def __init__(self, port, key_id, secret):
        cfg = Config(
            endpoint=f"127.0.0.1:{port}", protocol="http", access_key_id=key_id,
            access_key_secret=secret, read_timeout=60000, connect_timeout=5000,
        )
        self.client = Client(cfg)
        self.lock = threading.Lock()

    def call(self, action, **query):
        params = Params(
            action=action, version=API_VERSION, protocol="HTTP", pathname="/", method="POST",
            auth_type="AK", style="RPC", req_body_type="formData", body_type="json",
        )
        query = {k: str(v) for k, v in query.items() if v is not None}
        with self.lock:
            resp = self.client.call_api(params, OpenApiRequest(query=query), RuntimeOptions())
        if resp["statusCode"] != 200:
            raise RuntimeError(f"{action}: {resp}")
        return resp["body"]


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="strata-fleet-", dir="/var/tmp"))
        os.chmod(self.tmp, 0o755)
        # Clusters live where the postgres OS user may create them.
        self.pgdir = self.tmp / "pg"
        self.pgdir.mkdir()
        shutil.chown(self.pgdir, "postgres", "postgres")
        self.clusters = []  # (port, data dir)
        self.server = None
        self.api = None

    # ----- set-up -----

    def template(self):
        tpl = self.pgdir / "template"
        as_postgres(PGBIN / "initdb", "-D", tpl, "-U", "postgres", "--auth=trust",
                    capture_output=True, check=True)
        with open(tpl / "postgresql.conf", "a") as f:
            f.write(
                "listen_addresses = '127.0.0.1'\nshared_buffers = 16MB\nmax_connections = 20\n"
                "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\n"
                "autovacuum = off\nunix_socket_directories = ''\nfsync = on\n"
            )
        self.pg_ctl(tpl, 25999, "start")
        as_postgres(PGBIN / "pgbench", "-h", "127.0.0.1", "-p", 25999, "-U", "postgres", "-i",
                    "-s", "1", "-q", "postgres", capture_output=True, check=True)
        self.pg_ctl(tpl, 25999, "stop")
        return tpl

    def pg_ctl(self, data, port, action):
        as_postgres(PGBIN / "pg_ctl", "-D", data, "-o", f"-p {port}", "-w", "-l",
                    data.parent / f"{data.name}.log", action, capture_output=True, check=True)

    def start_clusters(self, n):
        tpl = self.template()
        for i in range(n):
            port = 26000 + i
            data = self.pgdir / f"pg{i:03d}"
            shutil.copytree(tpl, data, symlinks=True)
            subprocess.run(["chown", "-R", "postgres:postgres", data], check=True)
            self.pg_ctl(data, port, "start")
            self.clusters.append((port, data))
        log(f"{n} clusters running")

    def start_strata(self):
        strata = self.args.strata_bin
        cfg = self.tmp / "strata.toml"
        api_port = 25900
        cfg.write_text(
            f'data_dir = "{self.tmp / "strata"}"\n\n[server]\nlisten = "127.0.0.1:{api_port}"\n'
        )
        env = dict(os.environ, STRATA_LOG="warn")
        key = json.loads(subprocess.run(
            [strata, "--config", cfg, "key", "create", "--json"], capture_output=True,
            text=True, check=True, env=env,
        ).stdout)
        self.server = subprocess.Popen(
            [strata, "--config", cfg, "serve"], env=env,
            stdout=open(self.tmp / "serve.out", "w"), stderr=subprocess.STDOUT,
        )
        self.api = Api(api_port, key["AccessKeyId"], key["AccessKeySecret"])
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api.call("DescribeDBInstances", PageSize=30)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def register(self, upto):
        for i in range(len(self.instances()), upto):
            port, _ = self.clusters[i]
            iid = f"fleet-{i:03d}"
            self.api.call("StrataRegisterDBInstance", DBInstanceId=iid, Host="127.0.0.1",
                          Port=port, User="postgres", SSLMode="disable")
            hour = (time.gmtime().tm_hour + 12) % 24
            self.api.call("ModifyBackupPolicy", DBInstanceId=iid,
                          PreferredBackupTime=f"{hour:02d}:00Z-{(hour + 1) % 24:02d}:00Z")
            self.api.call("ModifyBackupPolicy", DBInstanceId=iid,
                          BackupPolicyMode="LogBackupPolicy", EnableBackupLog="True")
        self.wait_streaming(upto)

    def instances(self):
        body = self.api.call("DescribeDBInstances", PageSize=100)
        return body["Items"]["DBInstance"]

    def wait_streaming(self, n, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            items = self.instances()
            # Streaming, and the first backup that registration starts is done.
            streaming = [
                i for i in items
                if i.get("StrataWalReceiverState") == "Streaming" and i.get("StrataLastBackupTime")
            ]
            if len(items) >= n and len(streaming) >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(streaming)} of {n} receivers streaming after {timeout}s")
            time.sleep(1)

    # ----- measuring -----

    def proc_sample(self):
        pid = self.server.pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        rss_kb = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        return ticks / os.sysconf("SC_CLK_TCK"), rss_kb / 1024

    def measure(self, n):
        secs, rate = self.args.secs, self.args.rate
        load = [
            as_postgres_popen(PGBIN / "pgbench", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                              "-n", "-c", "1", "-R", rate, "-T", secs, "postgres")
            for port, _ in self.clusters[:n]
        ]
        stop = threading.Event()
        api_ms, lags, rss = [], [], []

        def api_loop():
            k = 0
            while not stop.is_set():
                t = time.monotonic()
                if k % 2 == 0:
                    self.api.call("DescribeDBInstances", PageSize=100)
                else:
                    self.api.call("DescribeBackups", DBInstanceId=f"fleet-{k % n:03d}")
                api_ms.append((time.monotonic() - t) * 1000)
                k += 1
                stop.wait(0.25)

        def lag_loop():
            while not stop.is_set():
                for port, _ in self.clusters[:n]:
                    out = psql(port, "SELECT coalesce(extract(epoch FROM flush_lag), 0) "
                                     "FROM pg_stat_replication WHERE application_name = 'strata'")
                    lags.extend(float(x) for x in out.split())
                stop.wait(2)

        threads = [threading.Thread(target=api_loop), threading.Thread(target=lag_loop)]
        cpu0, _ = self.proc_sample()
        t0 = time.monotonic()
        machine0 = machine_cpu_seconds()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < secs:
            rss.append(self.proc_sample()[1])
            time.sleep(1)
        cpu1, _ = self.proc_sample()
        wall = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join()
        for p in load:
            p.wait()
        machine = machine_cpu_seconds() - machine0
        return {
            "instances": n,
            "rss_mib": statistics.median(rss),
            "rss_peak_mib": max(rss),
            "cpu_pct": 100 * (cpu1 - cpu0) / wall,
            "machine_pct": 100 * machine / wall,
            "lag_p50": percentile(lags, 50),
            "lag_p99": percentile(lags, 99),
            "lag_samples": len(lags),
            "api_p50": percentile(api_ms, 50),
            "api_p99": percentile(api_ms, 99),
            "api_calls": len(api_ms),
        }

    # ----- tear-down -----

    def stop(self):
        if self.server and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
        for port, data in self.clusters:
            as_postgres(PGBIN / "pg_ctl", "-D", data, "-m", "immediate", "stop", capture_output=True)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")


def as_postgres_popen(*cmd):
    return subprocess.Popen(["runuser", "-u", "postgres", "--", *map(str, cmd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def machine_cpu_seconds():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    return sum(int(x) for x in parts[:3]) / os.sysconf("SC_CLK_TCK")


def report(rows, args):
    cores = os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    xs = [r["instances"] for r in rows]
    rss_a, rss_b = linear_fit(xs, [r["rss_mib"] for r in rows])
    cpu_a, cpu_b = linear_fit(xs, [r["cpu_pct"] for r in rows])
    # A node is full at 70 % of its cores or half its memory, whichever first.
    by_cpu = (0.7 * cores * 100 - cpu_a) / cpu_b if cpu_b > 0 else float("inf")
    by_mem = (0.5 * mem_gib * 1024 - rss_a) / rss_b if rss_b > 0 else float("inf")
    lines = [
        "## Cost per instance (one node)",
        "",
        f"Command: `bench/fleet.py --counts {args.counts} --secs {args.secs} --rate {args.rate}`."
        f" Machine: {cores} cores, {mem_gib:.0f} GiB. Each instance is a PostgreSQL 15 cluster"
        f" (pgbench scale 1) running pgbench at {args.rate} transactions/s during a {args.secs} s"
        " window, log backup on; Strata runs on SQLite and a local repository. The clusters and"
        " pgbench run on the same machine; only the Strata process's CPU and memory are counted.",
        "",
        "| instances | RSS MiB (median) | RSS MiB (peak) | Strata CPU % of one core | machine CPU % (all processes) | WAL flush lag p50 s | p99 s | API p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['rss_mib']:.1f} | {r['rss_peak_mib']:.1f} | {r['cpu_pct']:.1f} "
            f"| {r['machine_pct']:.0f} "
            f"| {r['lag_p50']:.3f} | {r['lag_p99']:.3f} | {r['api_p50']:.1f} | {r['api_p99']:.1f} |"
        )
    lines += [
        "",
        f"Linear fit: RSS ≈ {rss_a:.1f} MiB + {rss_b:.2f} MiB per instance; CPU ≈ {cpu_a:.1f} % +"
        f" {cpu_b:.3f} % of one core per instance. At this load a node of this size is full at"
        f" about {min(by_cpu, by_mem):.0f} instances ({by_cpu:.0f} by CPU at 70 % of {cores} cores,"
        f" {by_mem:.0f} by memory at half of {mem_gib:.0f} GiB). This extrapolates beyond the"
        " largest step measured, and assumes the per-instance cost stays linear; the lag columns"
        " say whether the measured steps kept WAL lag p99 under 1 s.",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10,25,50")
    ap.add_argument("--secs", type=int, default=60)
    ap.add_argument("--rate", type=int, default=5)
    ap.add_argument("--strata-bin", default=str(ROOT / "target" / "release" / "strata"))
    ap.add_argument("--out", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if os.getuid() != 0:
        sys.exit("run as root (clusters run as the postgres OS user)")
    counts = sorted(int(x) for x in args.counts.split(","))
    if not pathlib.Path(args.strata_bin).exists():
        subprocess.run(["cargo", "build", "--release", "-p", "strata"], cwd=ROOT, check=True)
    bench = Bench(args)
    rows = []
    try:
        bench.start_clusters(counts[-1])
        bench.start_strata()
        for n in counts:
            log(f"registering up to {n} instances")
            bench.register(n)
            log(f"measuring {n} instances for {args.secs} s")
            rows.append(bench.measure(n))
            log(json.dumps(rows[-1]))
    finally:
        bench.stop()
    text = report(rows, args)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
