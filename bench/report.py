#!/usr/bin/env python3
"""Turns bench/run.sh's raw results into the Markdown report.

Reads results.tsv (phase, tool, repetition, metric, value), the
`/usr/bin/time -v` files it points to and the WAL lag samples, prints the
tables and, with --out, writes them into that file between the markers
`<!-- bench:begin -->` and `<!-- bench:end -->` (the rest of the file, such
as hand-written profiling notes, stays as it is).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
from collections import defaultdict

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
NAMES = {
    "strata": "Strata",
    "pgbb_zstd": "pg_basebackup zstd:1",
    "pgbb": "pg_basebackup",
    "pgbackrest": "pgBackRest",
}
PEERS = ["pgbb_zstd", "pgbb", "pgbackrest"]


def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def parse_time_v(path):
    """CPU seconds (user + system) and peak RSS (KiB) from `time -v` output."""
    text = open(path).read()

    def num(label):
        m = re.search(re.escape(label) + r":\s*([0-9.]+)", text)
        return float(m.group(1)) if m else 0.0

    return {
        "cpu": num("User time (seconds)") + num("System time (seconds)"),
        "rss": num("Maximum resident set size (kbytes)"),
    }


def median(xs):
    return statistics.median(xs) if xs else None


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load(path):
    rows = defaultdict(lambda: defaultdict(dict))  # phase -> tool -> rep -> metric
    for line in open(path):
        phase, tool, rep, metric, value = line.rstrip("\n").split("\t")
        rows[phase][tool].setdefault(int(rep), {})[metric] = value
    return rows


def summarize(reps):
    """Median wall/CPU/bytes and the highest peak RSS over repetitions."""
    walls, cpus, rsss, stored = [], [], [], []
    for r in reps.values():
        if "wall" in r:
            walls.append(float(r["wall"]))
        if "time_file" in r and os.path.exists(r["time_file"]):
            t = parse_time_v(r["time_file"])
            cpus.append(t["cpu"])
            rsss.append(t["rss"] / 1024)
        if "bytes" in r:
            stored.append(float(r["bytes"]))
    return {
        "wall": median(walls),
        "walls": walls,
        "cpu": median(cpus),
        "rss": max(rsss) if rsss else None,
        "bytes": median(stored),
        "n": len(walls),
    }


def lag_stats(path, load_start, load_end):
    samples = [json.loads(line) for line in open(path) if line.strip()]
    if not samples:
        return None
    server_line = [(s["t"], s["server"]) for s in samples]

    def reached(pos):
        """When the server's WAL position first reached `pos` (interpolated)."""
        prev = None
        for t, lsn in server_line:
            if lsn >= pos:
                if prev is None or prev[1] >= pos:
                    return t
                (t0, l0) = prev
                return t0 + (t - t0) * (pos - l0) / (lsn - l0)
            prev = (t, lsn)
        return None

    during = [s for s in samples if load_start <= s["t"] <= load_end]
    lag_bytes = [max(0, s["server"] - s["stored"]) for s in during]
    lag_secs = []
    for s in during:
        if s["stored"] >= s["server"]:
            lag_secs.append(0.0)
            continue
        t = reached(s["stored"])
        lag_secs.append(max(0.0, s["t"] - t) if t is not None else s["t"] - samples[0]["t"])
    quarter = max(1, len(lag_bytes) // 4)
    last = samples[-1]
    wal_rate = (during[-1]["server"] - during[0]["server"]) / max(1e-9, during[-1]["t"] - during[0]["t"]) if len(during) > 1 else 0
    return {
        "n": len(during),
        "p50_s": percentile(lag_secs, 50),
        "p99_s": percentile(lag_secs, 99),
        "max_s": max(lag_secs) if lag_secs else None,
        "p50_mb": percentile(lag_bytes, 50) / 2**20,
        "p99_mb": percentile(lag_bytes, 99) / 2**20,
        "max_mb": max(lag_bytes) / 2**20,
        "first_q_mb": median(lag_bytes[:quarter]) / 2**20,
        "last_q_mb": median(lag_bytes[-quarter:]) / 2**20,
        "after_mb": max(0, last["server"] - last["stored"]) / 2**20,
        "wal_mb_s": wal_rate / 2**20,
    }


def fmt(v, unit="", digits=2):
    if v is None:
        return "—"
    if isinstance(v, float) and abs(v) >= 100:
        digits = 0
    elif isinstance(v, float) and abs(v) >= 10:
        digits = 1
    return f"{v:.{digits}f}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def machine(strata, pgbin, data_dir):
    cpu = ""
    for line in run("lscpu").splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    mem_kb = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    df = run("df", "-T", data_dir).splitlines()
    fs = df[-1].split() if len(df) > 1 else ["?", "?"]
    dev = os.path.basename(fs[0])
    rota = run("cat", f"/sys/block/{dev}/queue/rotational")
    disk = f"{fs[0]} ({fs[1]}, {'kernel says rotational' if rota == '1' else 'kernel says non-rotational' if rota == '0' else 'type unknown'}, {fs[2] if len(fs) > 2 else '?'} 1K-blocks)"
    commit = run("git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rev-parse", "--short", "HEAD")
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("RAM", f"{mem_kb / 2**20:.1f} GiB"),
        ("Disk", disk),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("OS", run("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME") + " " + run("cat", "/etc/debian_version")),
        ("PostgreSQL", run(f"{pgbin}/postgres", "--version")),
        ("pg_basebackup", run(f"{pgbin}/pg_basebackup", "--version")),
        ("pgBackRest", run("pgbackrest", "version")),
        ("Strata", f"{run(strata, '--version')} (commit {commit})"),
        ("zstd (pg_basebackup, pgBackRest)", run("sh", "-c", "dpkg-query -W -f '${Version}' libzstd1")),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--strata", required=True)
    ap.add_argument("--pgbin", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--size-gb", required=True)
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--lag-secs", required=True)
    ap.add_argument("--lag-clients", required=True)
    ap.add_argument("--drain-secs", required=True)
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--relations", type=int, default=0)
    ap.add_argument("--note", default="")
    a = ap.parse_args()

    rows = load(a.results)
    setup = rows["setup"]["dataset"][0]
    full = {t: summarize(rows["full"][t]) for t in NAMES if t in rows["full"]}
    incr = {t: summarize(rows["incr"][t]) for t in ("strata", "pgbackrest") if t in rows["incr"]}
    rest = {t: summarize(rows["restore"][t]) for t in ("strata", "pgbackrest") if t in rows["restore"]}
    full17 = summarize(rows["full17"]["strata"]) if "strata" in rows.get("full17", {}) else None
    incr17 = summarize(rows["incr17"]["strata"]) if "strata" in rows.get("incr17", {}) else None
    lag = {}
    for t in ("strata", "pgbackrest"):
        r = rows["lag"].get(t, {}).get(1)
        if not r or "samples" not in r:
            continue
        s = lag_stats(r["samples"], float(r["load_start"]), float(r["load_end"]))
        if t == "strata" and os.path.exists(r.get("time_file", "")):
            tv = parse_time_v(r["time_file"])
            s["cpu"], s["rss"] = tv["cpu"], tv["rss"] / 1024
        if t == "pgbackrest" and os.path.exists(r.get("push_times", "")):
            calls = [line.split() for line in open(r["push_times"]) if re.match(r"^[0-9.]+ ", line)]
            s["cpu"] = sum(float(c[1]) + float(c[2]) for c in calls)
            s["rss"] = max((float(c[3]) for c in calls), default=0) / 1024
            s["calls"] = len(calls)
        s["tps"] = float(r["tps"]) if r.get("tps") else None
        lag[t] = s

    out = []
    w = out.append
    title = "Smoke run (--quick): the numbers mean nothing" if a.quick else "Results"
    w(f"## {title}\n")
    db_mb = float(setup["db_bytes"]) / 2**20
    w(
        f"Dataset: {db_mb:.0f} MiB of databases ({float(setup['data_dir_bytes']) / 2**20:.0f} MiB data directory with its WAL): "
        f"pgbench scale {setup['pgbench_scale']}, {int(setup['text_rows']):,} rows of random hex text "
        f"(~260 characters each), {int(setup['bytea_rows']):,} rows of 1000 random bytes"
        + (
            f", {int(setup['relations']):,} small tables of 40 rows with a primary key"
            if int(setup.get("relations", 0))
            else ""
        )
        + f"; {int(setup.get('files', 0)):,} files under base/ and global/. "
        f"Each figure is the median of {a.reps} alternating repetitions (peak RSS: the highest). "
        f"Wall time of a backup includes its checkpoint (all tools ask for a fast one). "
        f"CPU = user + system seconds of the tool's processes (`/usr/bin/time -v`); the server's own "
        f"work (walsender, checkpointer) is not counted for any tool.\n"
    )
    loads = rows["setup"].get("machine", {}).get(0, {})
    if loads:
        w(
            f"Load average (1 min) when the run started: {loads.get('load_start', '?')}, when it ended: "
            f"{loads.get('load_end', '?')}.\n"
        )
    if a.note:
        w(a.note + "\n")

    head = "| measure | " + " | ".join(NAMES.values()) + " | " + " | ".join(f"Strata ÷ {NAMES[p]}" for p in PEERS) + " |"
    w(head)
    w("|" + "---|" * (1 + len(NAMES) + len(PEERS)))

    def line(label, table, key, unit="", scale=1.0, digits=2):
        vals = {t: (table[t][key] * scale if t in table and table[t][key] is not None else None) for t in NAMES}
        cells = [fmt(vals[t], unit, digits) for t in NAMES]
        ratios = [ratio(vals["strata"], vals[p]) for p in PEERS]
        w(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

    line("full backup, wall s", full, "wall")
    line("full backup, CPU s", full, "cpu")
    line("full backup, peak RSS MiB", full, "rss", digits=0)
    line("full backup, stored MiB", full, "bytes", scale=1 / 2**20, digits=0)
    line("backup after 1 % change, wall s", incr, "wall")
    line("backup after 1 % change, CPU s", incr, "cpu")
    line("backup after 1 % change, peak RSS MiB", incr, "rss", digits=0)
    line("backup after 1 % change, stored MiB", incr, "bytes", scale=1 / 2**20, digits=1)
    line("restore + recovery to a time, wall s", rest, "wall")
    line("restore, CPU s (restore command)", rest, "cpu")
    line("restore, peak RSS MiB", rest, "rss", digits=0)
    for key, label, digits in (
        ("p50_s", "WAL lag p50, s", 2),
        ("p99_s", "WAL lag p99, s", 2),
        ("max_s", "WAL lag max, s", 2),
        ("p50_mb", "WAL lag p50, MiB", 1),
        ("p99_mb", "WAL lag p99, MiB", 1),
        ("max_mb", "WAL lag max, MiB", 1),
        ("cpu", "WAL archiving, CPU s", 2),
        ("rss", "WAL archiving, peak RSS MiB", 0),
    ):
        line(label, lag, key, digits=digits)
    w("")

    if lag:
        w(
            f"WAL lag: `pgbench -c {a.lag_clients} -j 2 -T {a.lag_secs}` (TPC-B, synchronous commit) once per tool, "
            f"sampled every 200 ms. Lag in bytes = the server's `pg_current_wal_lsn()` minus the end of what is "
            f"stored (Strata: highest `end_lsn` in `strata wal list --json`, partial segments included; "
            f"pgBackRest: end of `pg_stat_archiver.last_archived_wal`). Lag in seconds = how long ago the server "
            f"was at the stored position. Only samples taken while pgbench ran count.\n"
        )
        w(f"| WAL archiving | pgbench tps | WAL MiB/s | lag MiB, first quarter median | last quarter median | {a.drain_secs} s after the load | archive-push calls |")
        w("|---|---|---|---|---|---|---|")
        for t, s in lag.items():
            w(
                f"| {NAMES[t]} | {fmt(s.get('tps'), '', 0)} | {fmt(s['wal_mb_s'], '', 1)} | {fmt(s['first_q_mb'], '', 1)} | "
                f"{fmt(s['last_q_mb'], '', 1)} | {fmt(s['after_mb'], '', 1)} | {s.get('calls', '—')} |"
            )
        w("")

    if rest:
        rows_seen = {
            t: sorted({r.get("history_rows") for r in rows["restore"][t].values()}) for t in rest
        }
        w(
            f"Restore target: {rows['restore']['target'][0]['time']} (mid-way through a pgbench run after the last backup). "
            f"pgbench_history rows after recovery: "
            + ", ".join(f"{NAMES[t]} {', '.join(v for v in rows_seen[t] if v)}" for t in rest)
            + " (equal means both stopped at the same transaction). pgBackRest's time is `pgbackrest restore` plus "
            "`pg_ctl start` until `pg_is_in_recovery()` is false; Strata's is `strata restore --time … --start`, "
            "which returns once the server is promoted and accepts connections.\n"
        )
        if "pgbackrest" in rows["restore"]:
            fw = [float(r["files_wall"]) for r in rows["restore"]["pgbackrest"].values() if "files_wall" in r]
            if fw:
                w(f"pgBackRest's file restore alone (before recovery): median {median(fw):.2f} s.\n")

    if full17 and incr17:
        info17 = rows["pg17"]["dataset"][0]
        received = [float(r["received"]) for r in rows["incr17"]["strata"].values() if r.get("received")]
        totals = [float(r["total"]) for r in rows["incr17"]["strata"].values() if r.get("total")]
        based = all(r.get("incremental_from") not in (None, "", "None") for r in rows["incr17"]["strata"].values())
        w("### PostgreSQL 17: only changed blocks sent\n")
        w(
            f"The same dataset ({float(info17['db_bytes']) / 2**20:.0f} MiB of databases) on {info17['version']} with "
            f"`summarize_wal = on`, the same 1 % change, {a.reps} repetitions (each a full backup into an empty "
            f"repository, then the change, then the next backup). From the second backup on, Strata uploads the "
            f"previous backup's manifest and asks for `INCREMENTAL`: the server reads its WAL summaries and sends "
            f"only changed blocks, and Strata rebuilds whole files from them and the previous backup's blocks. "
            f"pgBackRest 2.45 (Debian 12) does not support PostgreSQL 17, so this part has no peer column.\n"
        )
        w("| measure | full backup | backup after 1 % change | ratio |")
        w("|---|---|---|---|")
        for label, key, digits, scale in (
            ("wall s", "wall", 2, 1.0),
            ("CPU s", "cpu", 2, 1.0),
            ("peak RSS MiB", "rss", 0, 1.0),
            ("stored MiB", "bytes", 1, 1 / 2**20),
        ):
            fv = full17[key] * scale if full17[key] is not None else None
            iv = incr17[key] * scale if incr17[key] is not None else None
            w(f"| {label} | {fmt(fv, '', digits)} | {fmt(iv, '', digits)} | {ratio(iv, fv)} |")
        if received and totals:
            w(
                f"| sent by the server, MiB | {median(totals) / 2**20:.0f} (every file) | {median(received) / 2**20:.1f} | "
                f"{ratio(median(received), median(totals))} |"
            )
        w("")
        if not based:
            w("**Some backups after the change were not incremental** (see `incremental_from`).\n")

    # Goals of issue 7, from this run's ratios.
    def get(d, t, k):
        return d.get(t, {}).get(k)

    goals = []

    def goal(name, value, limit, ok_if_le=True, unit="×"):
        if value is None:
            goals.append((name, "—", "not measured"))
            return
        met = value <= limit if ok_if_le else value < limit
        goals.append((name, f"{value:.2f}{unit}", "met" if met else "not met"))

    fs, fb = get(full, "strata", "wall"), get(full, "pgbackrest", "wall")
    goal("full backup wall ≤ 0.67× pgBackRest", fs / fb if fs and fb else None, 0.67)
    fz = get(full, "pgbb_zstd", "wall")
    goal("full backup wall ≤ 1.0× pg_basebackup zstd:1", fs / fz if fs and fz else None, 1.0)
    bs, bb = get(full, "strata", "bytes"), get(full, "pgbackrest", "bytes")
    goal("stored ≤ 1.1× pgBackRest's bytes", bs / bb if bs and bb else None, 1.1)
    iw = get(incr, "strata", "wall")
    goal("backup after 1 % change ≤ 0.10× Strata's full backup (PostgreSQL 15: every byte sent)",
         iw / fs if iw and fs else None, 0.10)
    if full17 and incr17:
        f7, i7 = full17["wall"], incr17["wall"]
        goal("backup after 1 % change ≤ 0.10× Strata's full backup (PostgreSQL 17: changed blocks sent)",
             i7 / f7 if i7 and f7 else None, 0.10)
    rs, rb = get(rest, "strata", "wall"), get(rest, "pgbackrest", "wall")
    goal("restore to a time ≤ 0.8× pgBackRest", rs / rb if rs and rb else None, 0.8)
    goal("WAL lag p99 < 1 s", get(lag, "strata", "p99_s"), 1.0, ok_if_le=False, unit=" s")
    rss = get(full, "strata", "rss")
    goal("peak RSS of a full backup < 256 MiB", rss, 256, ok_if_le=False, unit=" MiB")
    if "strata" in lag:
        s = lag["strata"]
        steady = s["last_q_mb"] <= max(2 * s["first_q_mb"], 1.0) and s["after_mb"] < 1.0
        goals.append(("never falling behind (last-quarter lag ≤ 2× first, caught up after the load)",
                      f"{s['first_q_mb']:.1f} → {s['last_q_mb']:.1f} MiB, {s['after_mb']:.1f} MiB after",
                      "met" if steady else "not met"))
    w("| goal (issue 7) | this run | |")
    w("|---|---|---|")
    for name, value, verdict in goals:
        w(f"| {name} | {value} | {verdict} |")
    w("")

    w("### Machine\n")
    w("| | |")
    w("|---|---|")
    for k, v in machine(a.strata, a.pgbin, a.data_dir):
        w(f"| {k} | {v} |")
    w("")
    w(
        "Command: `bench/run.sh "
        + ("--quick" if a.quick else f"--size-gb {a.size_gb} --reps {a.reps} --lag-secs {a.lag_secs}")
        + (f" --relations {a.relations}" if a.relations else "")
        + "`\n"
    )

    text = "\n".join(out)
    print(text)
    if a.out:
        block = f"{BEGIN}\n{text}\n{END}"
        if os.path.exists(a.out):
            doc = open(a.out).read()
            if BEGIN in doc and END in doc:
                doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
            else:
                doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        else:
            doc = "# Benchmarks\n\n" + block + "\n"
        with open(a.out, "w") as f:
            f.write(doc)


if __name__ == "__main__":
    main()
