#!/usr/bin/env python3
"""Samples WAL archive lag about every 200 ms until a stop file appears.

Each sample is one JSON line: {"t": unix time, "server": LSN, "stored": LSN}.
- strata: `stored` is the highest end LSN of the WAL objects Strata lists
  (`strata wal list --json`, partial segments included); it is read before
  the server position, so the lag is never understated.
- pgbackrest: `stored` is the end of the last segment pg_stat_archiver
  reports archived; read in the same query as the server position.
"""

import argparse
import json
import os
import subprocess
import time

SEGMENT = 16 * 2**20


def lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def segment_end(name):
    segno = int(name[8:16], 16) * (2**32 // SEGMENT) + int(name[16:24], 16)
    return (segno + 1) * SEGMENT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", choices=["strata", "pgbackrest"], required=True)
    ap.add_argument("--psql", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", required=True)
    ap.add_argument("--strata")
    ap.add_argument("--strata-config")
    ap.add_argument("--instance", default="bench")
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.2)
    a = ap.parse_args()

    psql = ["runuser", "-u", "postgres", "--", a.psql, "-h", a.host, "-p", a.port,
            "-U", "postgres", "-d", "postgres", "-XAtq", "-F", " ", "-c"]
    query = ("SELECT pg_current_wal_lsn(), coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    archived = 0
    with open(a.out, "w") as out:
        next_tick = time.monotonic()
        while not os.path.exists(a.stop_file):
            stored = None
            if a.tool == "strata":
                listing = subprocess.run(
                    [a.strata, "--config", a.strata_config, "wal", "list", a.instance, "--json"],
                    capture_output=True, text=True)
                if listing.returncode == 0:
                    stored = max((lsn(w["end_lsn"]) for w in json.loads(listing.stdout)), default=0)
            t = time.time()
            res = subprocess.run(psql + [query], capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.strip():
                server, _, last = res.stdout.strip().partition(" ")
                if a.tool == "pgbackrest":
                    # .history and .backup files say nothing about progress.
                    if len(last) == 24:
                        archived = segment_end(last)
                    stored = archived
                if stored is not None:
                    out.write(json.dumps({"t": t, "server": lsn(server), "stored": stored}) + "\n")
                    out.flush()
            next_tick += a.interval
            time.sleep(max(0.0, next_tick - time.monotonic()))


if __name__ == "__main__":
    main()
