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

    bench/fleet.py [--counts 10,25,50] [--secs 60] [--rate 5] [--settle 30]
                   [--config-extra TOML] [--strata-bin PATH] [--out FILE] [--keep]
    bench/fleet.py --failover [--failover-instances 12] [--kills 5] [--rate 5]

With --failover it measures failover instead: a PostgreSQL 15 catalog server
started here, three `strata serve` nodes (distinct `[node] id` and ports, one
shared repository directory, default `node.lease_secs`), the instances spread
over them with log backup on and pgbench at the fixed rate; then, --kills
times, SIGKILL of the node owning the most instances and the time until every
one of its instances streams WAL on a survivor (`StrataNode` names the owner,
`StrataWalReceiverState` on that owner says `Streaming`; polled every 200 ms),
a restart of the killed node and a wait until the spread settles. API latency
(DescribeDBInstances and DescribeBackups alternating) is timed on every node
throughout.

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
            + self.args.config_extra.replace("\\n", "\n") + "\n"
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

    def register(self, upto, wait=True):
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
        if wait:
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

    def written(self):
        """Bytes the Strata process had written (write(2), /proc/PID/io wchar)."""
        with open(f"/proc/{self.server.pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
        return 0

    def proc_detail(self):
        """Thread count and /proc/PID/smaps_rollup (kB) of the Strata process."""
        pid = self.server.pid
        threads_n = len(os.listdir(f"/proc/{pid}/task"))
        smaps = {}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    smaps[parts[0].rstrip(":")] = int(parts[1])
        return threads_n, smaps

    def measure(self, n):
        secs, rate = self.args.secs, self.args.rate
        wal_sql = "SELECT pg_current_wal_lsn() - '0/0'"
        wal0 = float(psql(self.clusters[0][0], wal_sql))
        load = [
            as_postgres_popen(PGBIN / "pgbench", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                              "-n", "-c", "1", "-R", rate, "-T", secs, "postgres")
            for port, _ in self.clusters[:n]
        ]
        stop = threading.Event()
        api_ms, lags, rss = [], [], []
        worst = {}  # cluster index -> largest lag seen
        behind = []  # bytes not yet acknowledged, at samples with a lag over 1 s

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

        # One long-lived psql per cluster: starting a psql per sample for 50
        # clusters every 2 s would itself take a good part of a core.
        samplers = [
            subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(PGBIN / "psql"), "-h", "127.0.0.1",
                 "-p", str(port), "-U", "postgres", "-d", "postgres", "-XAtq"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, bufsize=1,
            )
            for port, _ in self.clusters[:n]
        ]
        # Always one row: -1 when no walsender of Strata is connected.
        # With the lag, how far the acknowledged flush position is behind the
        # server's WAL at that moment (bytes): a lag of seconds with next to
        # nothing unacknowledged is the reporting cadence, not a backlog.
        lag_sql = ("SELECT coalesce(max(extract(epoch FROM coalesce(flush_lag, '0'))), -1)"
                   " || ' ' || coalesce(max(pg_current_wal_lsn() - flush_lsn), 0)"
                   " FROM pg_stat_replication WHERE application_name = 'strata';\n")

        def lag_loop():
            while not stop.is_set():
                for s in samplers:
                    s.stdin.write(lag_sql)
                for k, s in enumerate(samplers):
                    line = s.stdout.readline().split()
                    v = float(line[0]) if line else -1
                    if v >= 0:
                        lags.append(v)
                        if v > 1:
                            behind.append(float(line[1]))
                        worst[k] = max(worst.get(k, 0.0), v)
                stop.wait(2)

        threads = [threading.Thread(target=api_loop), threading.Thread(target=lag_loop)]
        cpu0, _ = self.proc_sample()
        written0 = self.written()
        t0 = time.monotonic()
        machine0 = machine_cpu_seconds()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < secs:
            rss.append(self.proc_sample()[1])
            time.sleep(1)
        cpu1, _ = self.proc_sample()
        wall = time.monotonic() - t0
        written = (self.written() - written0) / 2**20 / wall
        threads_n, smaps = self.proc_detail()
        stop.set()
        for t in threads:
            t.join()
        for p in load:
            p.wait()
        for smp in samplers:
            smp.stdin.close()
            smp.wait()
        machine = [b - a for a, b in zip(machine0, machine_cpu_seconds())]
        wal_kib_s = (float(psql(self.clusters[0][0], wal_sql)) - wal0) / 1024 / wall
        return {
            "instances": n,
            "rss_mib": statistics.median(rss),
            "rss_peak_mib": max(rss),
            "rss_first_mib": rss[0],
            "rss_last_mib": rss[-1],
            "rss_every_10s": [round(x) for x in rss[::10]],
            "wal_kib_s": wal_kib_s,
            "written_mib_s": written,
            "threads": threads_n,
            "anon_mib": smaps.get("Anonymous", 0) / 1024,
            "private_dirty_mib": smaps.get("Private_Dirty", 0) / 1024,
            "cpu_pct": 100 * (cpu1 - cpu0) / wall,
            "machine_pct": 100 * machine[0] / wall,
            "niced_pct": 100 * machine[1] / wall,
            "load_end": loadavg(),
            "lag_p50": percentile(lags, 50),
            "lag_p99": percentile(lags, 99),
            "lag_samples": len(lags),
            "lag_over_1s_bytes_behind_p50": percentile(behind, 50),
            "lag_over_1s_bytes_behind_max": max(behind, default=0),
            "lag_over_1s_samples": len(behind),
            "lag_worst": sorted(((round(v, 2), f"fleet-{k:03d}") for k, v in worst.items()),
                                reverse=True)[:5],
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


class Failover:
    """Three `strata serve` nodes on one PostgreSQL catalog and one shared
    repository directory; kills the node owning the most instances with
    SIGKILL and times how long until every one of its instances streams WAL
    on a survivor."""

    NODES = ("node-a", "node-b", "node-c")

    def __init__(self, args):
        self.args = args
        # The clusters and the template come from the cost part's set-up.
        self.bench = Bench(args)
        self.tmp = self.bench.tmp
        self.catalog_port = 25800
        self.catalog_data = None
        self.procs = {}  # node id -> Popen
        self.ports = {n: 25901 + k for k, n in enumerate(self.NODES)}
        self.apis = {}  # node id -> Api for polling
        self.lat_apis = {}  # node id -> Api for the latency loop
        self.load = []

    # ----- set-up -----

    def start_catalog(self):
        data = self.bench.pgdir / "catalog"
        as_postgres(PGBIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                    capture_output=True, check=True)
        with open(data / "postgresql.conf", "a") as f:
            f.write("listen_addresses = '127.0.0.1'\nshared_buffers = 64MB\n"
                    "max_connections = 300\nunix_socket_directories = ''\n")
        self.bench.pg_ctl(data, self.catalog_port, "start")
        self.catalog_data = data
        psql(self.catalog_port, "CREATE DATABASE strata")
        return f"postgres://postgres@127.0.0.1:{self.catalog_port}/strata?sslmode=disable"

    def config(self, node, url):
        cfg = self.tmp / f"{node}.toml"
        cfg.write_text(
            f'data_dir = "{self.tmp / node}"\ncatalog = "{url}"\n'
            f'repository = "{self.tmp / "repo"}"\n\n'
            f'[server]\nlisten = "127.0.0.1:{self.ports[node]}"\n\n'
            f'[node]\nid = "{node}"\n\n[drills]\nenabled = false\n'
        )
        return cfg

    def start_node(self, node):
        env = dict(os.environ, STRATA_LOG="warn")
        self.procs[node] = subprocess.Popen(
            [self.args.strata_bin, "--config", self.tmp / f"{node}.toml", "serve"], env=env,
            stdout=open(self.tmp / f"{node}.out", "a"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.apis[node].call("DescribeDBInstances", PageSize=30)
                return
            except Exception:
                if self.procs[node].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{node} did not come up; see {self.tmp / node}.out")
                time.sleep(0.2)

    def setup(self):
        n = self.args.failover_instances
        self.bench.start_clusters(n)
        url = self.start_catalog()
        for node in self.NODES:
            self.config(node, url)
        r = subprocess.run(
            [self.args.strata_bin, "--config", self.tmp / f"{self.NODES[0]}.toml", "key",
             "create", "--json"],
            capture_output=True, text=True, env=dict(os.environ, STRATA_LOG="warn"),
        )
        if r.returncode != 0:
            raise RuntimeError(f"strata key create: {r.stderr}")
        key = json.loads(r.stdout)
        for node in self.NODES:
            self.apis[node] = Api(self.ports[node], key["AccessKeyId"], key["AccessKeySecret"])
            self.lat_apis[node] = Api(self.ports[node], key["AccessKeyId"],
                                      key["AccessKeySecret"])
        for node in self.NODES:
            self.start_node(node)
        log("3 nodes up on the PostgreSQL catalog")
        # Registered through the first node's API; owned wherever the lease lands.
        self.bench.api = self.apis[self.NODES[0]]
        # Each node reports only the WAL receivers it runs: wait through the owners.
        self.bench.register(n, wait=False)
        self.wait_settled(time.monotonic(), timeout=600, first_backup=True)
        log(f"{n} instances streaming, spread {self.spread(self.view(self.NODES))}")

    # ----- observing -----

    def view(self, nodes):
        """Per instance: (owner, WAL receiver state on the owner), from the
        answers of `nodes` (each node reports its own receivers only)."""
        answers = {}
        for node in nodes:
            items = self.apis[node].call("DescribeDBInstances", PageSize=100)["Items"]["DBInstance"]
            answers[node] = {i["DBInstanceId"]: i for i in items}
        out = {}
        for iid in answers[nodes[0]]:
            owner = answers[nodes[0]][iid].get("StrataNode", "")
            state = answers[owner][iid].get("StrataWalReceiverState", "") if owner in answers else ""
            out[iid] = (owner, state)
        return out

    @staticmethod
    def spread(view):
        counts = {}
        for owner, _ in view.values():
            counts[owner] = counts.get(owner, 0) + 1
        return dict(sorted(counts.items()))

    def wait_settled(self, t0, timeout=240, steady=5.0, first_backup=False):
        """Until every node owns some instances, each streams on its owner,
        and ownership has not changed for `steady` seconds."""
        deadline = t0 + timeout
        last, since = None, None
        while True:
            try:
                v = self.view(list(self.NODES))
                backed_up = not first_backup or all(
                    i.get("StrataLastBackupTime") for i in self.apis[self.NODES[0]].call(
                        "DescribeDBInstances", PageSize=100)["Items"]["DBInstance"])
            except Exception:
                v, backed_up = None, False
            ok = (v is not None and backed_up and len(v) == self.args.failover_instances
                  and all(s == "Streaming" for _, s in v.values())
                  and set(self.spread(v)) == set(self.NODES))
            owners = {k: o for k, (o, _) in v.items()} if v else None
            now = time.monotonic()
            if ok and owners == last:
                if now - since >= steady:
                    return since - t0
            else:
                last, since = (owners if ok else None), now
            if now > deadline:
                raise RuntimeError(f"not settled after {timeout}s: {v}")
            time.sleep(0.5)

    # ----- the kills -----

    def kill_once(self, round_no):
        v = self.view(list(self.NODES))
        spread = self.spread(v)
        victim = max(self.NODES, key=lambda n: spread.get(n, 0))
        lost = sorted(i for i, (o, _) in v.items() if o == victim)
        survivors = [n for n in self.NODES if n != victim]
        t0 = time.monotonic()
        self.procs[victim].kill()
        self.procs[victim].wait()
        resumed = {}
        while len(resumed) < len(lost):
            time.sleep(0.2)
            try:
                now_view = self.view(survivors)
            except Exception as e:  # a survivor's answer failing is itself a finding
                log(f"poll failed: {e}")
                continue
            t = time.monotonic() - t0
            for iid in lost:
                owner, state = now_view.get(iid, ("", ""))
                if iid not in resumed and owner in survivors and state == "Streaming":
                    resumed[iid] = t
            if t > 180:
                raise RuntimeError(f"round {round_no}: only {len(resumed)} of {len(lost)} "
                                   f"instances resumed after 180 s")
        failover = max(resumed.values())
        log(f"round {round_no}: killed {victim} ({len(lost)} instances), all streaming on "
            f"survivors after {failover:.1f} s (first {min(resumed.values()):.1f} s)")
        t1 = time.monotonic()
        self.start_node(victim)
        settle = self.wait_settled(t1)
        after = self.spread(self.view(list(self.NODES)))
        log(f"round {round_no}: {victim} restarted, spread settled after {settle:.1f} s: {after}")
        return {
            "round": round_no, "victim": victim, "instances": len(lost),
            "first_s": min(resumed.values()), "all_s": failover, "settle_s": settle,
            "spread_before": spread, "spread_after": after,
        }

    def run(self):
        self.setup()
        n = self.args.failover_instances
        for port, _ in self.bench.clusters[:n]:
            self.load.append(subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(PGBIN / "pgbench"), "-h", "127.0.0.1",
                 "-p", str(port), "-U", "postgres", "-n", "-c", "1", "-R",
                 str(self.args.rate), "-T", "3600", "postgres"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))
        stop = threading.Event()
        api_ms = {node: [] for node in self.NODES}
        api_err = {node: 0 for node in self.NODES}

        def api_loop(node):
            k = 0
            while not stop.is_set():
                if self.procs[node].poll() is not None:  # killed: nothing to time
                    stop.wait(0.25)
                    continue
                t = time.monotonic()
                try:
                    if k % 2 == 0:
                        self.lat_apis[node].call("DescribeDBInstances", PageSize=100)
                    else:
                        self.lat_apis[node].call("DescribeBackups",
                                                 DBInstanceId=f"fleet-{k % n:03d}")
                    api_ms[node].append((time.monotonic() - t) * 1000)
                except Exception:
                    api_err[node] += 1
                k += 1
                stop.wait(0.25)

        threads = [threading.Thread(target=api_loop, args=(node,)) for node in self.NODES]
        for t in threads:
            t.start()
        rounds = []
        try:
            time.sleep(10)  # the load and the API loops warm up
            for r in range(1, self.args.kills + 1):
                rounds.append(self.kill_once(r))
        finally:
            stop.set()
            for t in threads:
                t.join()
            for p in self.load:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                p.wait()
        api = {
            node: {"p50": percentile(api_ms[node], 50), "p99": percentile(api_ms[node], 99),
                   "calls": len(api_ms[node]), "errors": api_err[node]}
            for node in self.NODES
        }
        return rounds, api

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.catalog_data:
            as_postgres(PGBIN / "pg_ctl", "-D", self.catalog_data, "-m", "fast", "stop",
                        capture_output=True)
        self.bench.stop()


def failover_report(rounds, api, args, load_start, load_end):
    times = [r["all_s"] for r in rounds]
    lines = [
        "## Failover (three nodes, PostgreSQL catalog)",
        "",
        f"Command: `bench/fleet.py --failover --failover-instances {args.failover_instances}"
        f" --kills {args.kills} --rate {args.rate}`. Three `strata serve` processes on one"
        " PostgreSQL 15 catalog and one shared repository directory, default `node.lease_secs`"
        f" (20 s) and scheduler tick (1 s); {args.failover_instances} PostgreSQL 15 clusters, log"
        f" backup on, pgbench at {args.rate} transactions/s on each throughout. Each round kills"
        " (SIGKILL) the node owning the most instances and times from the kill until every one of"
        " its instances shows `StrataWalReceiverState` `Streaming` on the survivor that"
        " `StrataNode` names (both survivors polled every 200 ms), then restarts the killed node"
        " and waits until every node owns instances, all stream, and ownership has not changed"
        f" for 5 s. Load average (1 min) {load_start:.2f} at the start, {load_end:.2f} at the end.",
        "",
        "| round | killed | its instances | first resumed s | all resumed s | spread before | rejoin settled s | spread after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda d: " / ".join(str(v) for _, v in sorted(d.items()))  # noqa: E731
    for r in rounds:
        lines.append(
            f"| {r['round']} | {r['victim']} | {r['instances']} | {r['first_s']:.1f} "
            f"| {r['all_s']:.1f} | {fmt(r['spread_before'])} | {r['settle_s']:.1f} "
            f"| {fmt(r['spread_after'])} |"
        )
    lines += [
        "",
        f"Failover time (kill → all of the node's instances streaming elsewhere): median"
        f" {statistics.median(times):.1f} s, max {max(times):.1f} s, against the documented bound"
        " of `node.lease_secs` (20 s) + one tick + connecting, goal 30 s.",
        "",
        "| node | API p50 ms | API p99 ms | calls | failed calls |",
        "|---|---|---|---|---|",
    ]
    for node, a in api.items():
        lines.append(f"| {node} | {a['p50']:.1f} | {a['p99']:.1f} | {a['calls']} | {a['errors']} |")
    lines.append("")
    return "\n".join(lines)


def as_postgres_popen(*cmd):
    return subprocess.Popen(["runuser", "-u", "postgres", "--", *map(str, cmd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def machine_cpu_seconds():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    """CPU seconds of the whole machine: (user + system, niced user)."""
    user, nice, system = (int(x) / os.sysconf("SC_CLK_TCK") for x in parts[:3])
    return user + system, nice


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def report(rows, args, load_start, load_end):
    cores = os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    xs = [r["instances"] for r in rows]
    rss_a, rss_b = linear_fit(xs, [r["rss_mib"] for r in rows])
    cpu_a, cpu_b = linear_fit(xs, [r["cpu_pct"] for r in rows])
    # A node is full at 70 % of its cores or half its memory, whichever first.
    by_cpu = (0.7 * cores * 100 - cpu_a) / cpu_b if cpu_b > 0 else float("inf")
    by_mem = (0.5 * mem_gib * 1024 - rss_a) / rss_b if rss_b > 0 else float("inf")
    command = (
        f"`bench/fleet.py --counts {args.counts} --secs {args.secs} --rate {args.rate}"
        f" --settle {args.settle}"
        + (f" --config-extra '{args.config_extra}'" if args.config_extra else "")
        + (f"` with `MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']}`."
           if os.environ.get("MALLOC_ARENA_MAX") else "`.")
    )
    lines = [
        "## Cost per instance (one node)",
        "",
        f"Command: {command}"
        f" Machine: {cores} cores, {mem_gib:.0f} GiB. Each instance is a PostgreSQL 15 cluster"
        f" (pgbench scale 1) running pgbench at {args.rate} transactions/s during a {args.secs} s"
        " window, log backup on; Strata runs on SQLite and a local repository. The clusters and"
        " pgbench run on the same machine; only the Strata process's CPU and memory are counted."
        f" WAL written per instance: about {statistics.median(r['wal_kib_s'] for r in rows):.0f} KiB/s."
        f" Load average (1 min) {load_start:.2f} at the start of the run, {load_end:.2f} at the end"
        " (other processes on the machine count in it).",
        "",
        "| instances | RSS MiB (median) | RSS MiB (peak) | Strata CPU % of one core | machine CPU % (not niced) | niced CPU % (other builds) | load avg at end | WAL flush lag p50 s | p99 s | API p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['rss_mib']:.1f} | {r['rss_peak_mib']:.1f} | {r['cpu_pct']:.1f} "
            f"| {r['machine_pct']:.0f} | {r['niced_pct']:.0f} | {r['load_end']:.1f} "
            f"| {r['lag_p50']:.3f} | {r['lag_p99']:.3f} | {r['api_p50']:.1f} | {r['api_p99']:.1f} |"
        )
    lines += [
        "",
        "| instances | RSS MiB first / last sample of the window | anonymous MiB | private dirty MiB | threads | written by Strata MiB/s | WAL KiB/s per instance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['rss_first_mib']:.1f} / {r['rss_last_mib']:.1f} "
            f"| {r['anon_mib']:.1f} | {r['private_dirty_mib']:.1f} | {r['threads']} "
            f"| {r['written_mib_s']:.1f} | {r['wal_kib_s']:.0f} |"
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
    ap.add_argument("--config-extra", default="",
                    help='TOML appended to the node\'s strata.toml, e.g. "[wal]\\nflush_interval_ms = 1000"')
    ap.add_argument("--settle", type=int, default=30,
                    help="seconds between registering a step and measuring it")
    ap.add_argument("--failover", action="store_true",
                    help="measure failover on three nodes instead of the cost per instance")
    ap.add_argument("--failover-instances", type=int, default=12)
    ap.add_argument("--kills", type=int, default=5)
    args = ap.parse_args()
    if os.getuid() != 0:
        sys.exit("run as root (clusters run as the postgres OS user)")
    counts = sorted(int(x) for x in args.counts.split(","))
    if not pathlib.Path(args.strata_bin).exists():
        subprocess.run(["cargo", "build", "--release", "-p", "strata"], cwd=ROOT, check=True)
    # SIGTERM (and SIGINT, which a background job ignores) stop cleanly: the
    # `finally` blocks stop every process started and remove the directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    load_start = loadavg()
    log(f"load average at start: {load_start:.2f}")
    if args.failover:
        fo = Failover(args)
        try:
            rounds, api = fo.run()
        finally:
            fo.stop()
        load_end = loadavg()
        log(f"load average at end: {load_end:.2f}")
        text = failover_report(rounds, api, args, load_start, load_end)
        if args.out:
            pathlib.Path(args.out).write_text(text)
        print(text)
        return
    bench = Bench(args)
    rows = []
    try:
        bench.start_clusters(counts[-1])
        bench.start_strata()
        for n in counts:
            log(f"registering up to {n} instances")
            bench.register(n)
            if args.settle:
                log(f"letting {n} instances settle for {args.settle} s")
                time.sleep(args.settle)
            log(f"measuring {n} instances for {args.secs} s")
            rows.append(bench.measure(n))
            log(json.dumps(rows[-1]))
    finally:
        bench.stop()
    load_end = loadavg()
    log(f"load average at end: {load_end:.2f}")
    text = report(rows, args, load_start, load_end)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
