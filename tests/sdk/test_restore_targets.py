"""Restores exact to a transaction, through the official SDK: one
destructive transaction T (it deletes every row of a table while another
session keeps committing next to it) is undone by RestoreTable and
CloneDBInstance with the extension parameters StrataRestoreTargetXid or
StrataRestoreTargetLsn and StrataRestoreTargetInclusive; the data restored
is compared row for row with what was committed just before T (and just
after it). A backup taken after T is there to be passed over. Malformed and
conflicting targets are refused with their codes."""

import os
import re
import subprocess
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h
from test_restore import PG_BIN, as_postgres, psql_at, psql_db, wait_recoverable_past, wait_running

DB = "undo"
DIGEST = "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM {} t"


def digest(table, db=DB, port=None):
    sql = DIGEST.format(table)
    return psql_db(db, sql) if port is None else psql_at(port, sql, db=db)


def neighbour_loop(rows):
    """Another session committing one row of `n1` at a time, ids 1..rows in order."""
    sql = (f"DO $$ BEGIN FOR i IN 1..{rows} LOOP INSERT INTO n1 VALUES (i, md5(i::text)); "
           "COMMIT; PERFORM pg_sleep(0.01); END LOOP; END $$;")
    cmd = [f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", h.pg_host(),
           "-p", str(h.pg_port()), "-U", "postgres", "-d", DB, "-c", sql]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.Popen(cmd, cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Destroyed:
    """What happened around the destructive transaction T."""


@pytest.fixture(scope="module")
def destroyed(instance, admin):
    for stmt in (f"DROP DATABASE IF EXISTS {DB}", f"CREATE DATABASE {DB}"):
        psql_db("postgres", stmt)
    psql_db(DB, "CREATE EXTENSION pg_walinspect;"
                "CREATE TABLE t1 (id int PRIMARY KEY, note text, amount numeric);"
                "INSERT INTO t1 SELECT g, md5(g::text), g * 1.5 FROM generate_series(1, 60) g;"
                "CREATE TABLE n1 (id int PRIMARY KEY, note text);"
                "CREATE TABLE n2 (id int PRIMARY KEY);")
    # The set T must be restored from: the registration's first one has no t1.
    before = h.backup(admin, instance.id)
    loop = neighbour_loop(500)
    time.sleep(1.0)
    psql_db(DB, "UPDATE t1 SET note = 'changed before T' WHERE id % 7 = 0")
    d = Destroyed()
    d.backup_before = before.backup_id
    d.n1_before = int(psql_db(DB, "SELECT coalesce(max(id), 0) FROM n1"))
    d.pre = digest("t1")
    start = psql_db(DB, "SELECT pg_current_wal_insert_lsn()")
    out = psql_db(DB, "BEGIN; DELETE FROM t1;"
                      "SELECT 'xid=' || (txid_current() % 4294967296); COMMIT;")
    d.xid = int(re.search(r"xid=(\d+)", out).group(1))
    d.n1_after = int(psql_db(DB, "SELECT max(id) FROM n1"))
    assert d.n1_before < d.n1_after, "the neighbour session did not commit around T"
    assert digest("t1") == "0:"
    # After T: t1 itself and its neighbours change again, a backup is taken.
    psql_db(DB, "INSERT INTO t1 VALUES (1001, 'after T', 1), (1002, 'after T', 2), (1003, 'after T', 3)")
    psql_db(DB, "INSERT INTO n2 SELECT generate_series(1, 50)")
    assert loop.wait(timeout=120) == 0, loop.stderr.read()
    d.backup_after = h.backup(admin, instance.id).backup_id
    psql_db(DB, "INSERT INTO t1 VALUES (2001, 'after the backup', 4)")
    d.commit_lsn = psql_db(DB, "SELECT start_lsn FROM pg_get_wal_records_info("
                               f"'{start}', pg_current_wal_flush_lsn()) "
                               f"WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' "
                               f"AND xid = '{d.xid}'")
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", d.commit_lsn), d.commit_lsn
    psql_db(DB, "SELECT pg_switch_wal()")
    wait_recoverable_past(admin, instance.id, h.utcnow().replace(microsecond=0))
    return d


def restore_table(client, instance, new_name, **target):
    meta = (f'[{{"type":"db","name":"{DB}","tables":'
            f'[{{"type":"table","name":"public.t1","newname":"{new_name}"}}]}}]')
    body = h.call(client, "RestoreTable", DBInstanceId=instance.id, TableMeta=meta, **target)
    job = h.wait_job(client, instance.id, body["StrataJobId"], timeout=180)
    assert job.backup_status == "Finished", h.jobs(client, instance.id, BackupJobId=body["StrataJobId"])
    return job


def test_restore_table_just_before_and_just_after_a_transaction(instance, admin, destroyed):
    d = destroyed
    v2 = h.make_client("v2", *h.admin_key())
    restore_table(v2, instance, "t1_before",
                  StrataRestoreTargetXid=d.xid, StrataRestoreTargetInclusive="false")
    assert digest("t1_before") == d.pre
    restore_table(admin, instance, "t1_after",
                  StrataRestoreTargetXid=d.xid, StrataRestoreTargetInclusive="true")
    assert digest("t1_after") == "0:"
    # Inclusive is the default, as in PostgreSQL.
    restore_table(admin, instance, "t1_default", StrataRestoreTargetXid=d.xid)
    assert digest("t1_default") == "0:"


def test_restore_table_just_before_the_commit_record(instance, admin, destroyed):
    d = destroyed
    restore_table(admin, instance, "t1_lsn_before",
                  StrataRestoreTargetLsn=d.commit_lsn, StrataRestoreTargetInclusive="false")
    assert digest("t1_lsn_before") == d.pre
    restore_table(admin, instance, "t1_lsn_at",
                  StrataRestoreTargetLsn=d.commit_lsn, StrataRestoreTargetInclusive="1")
    assert digest("t1_lsn_at") == "0:"
    # The original is as it was: T, then the rows inserted after it.
    assert psql_db(DB, "SELECT string_agg(id::text, ',' ORDER BY id) FROM t1") == "1001,1002,1003,2001"


def test_clone_just_before_a_transaction(instance, admin, destroyed):
    d = destroyed
    body = h.call(admin, "CloneDBInstance", DBInstanceId=instance.id,
                  StrataRestoreTargetXid=d.xid, StrataRestoreTargetInclusive="False")
    clone = body["DBInstanceId"]
    a, _ = wait_running(admin, clone)
    port = int(a["Port"])
    try:
        assert digest("t1", port=port) == d.pre
        # The neighbour session's rows: everything committed before T's
        # commit, nothing after it; n2 was filled after T.
        n1_count, n1_max = map(int, psql_at(port, "SELECT count(*), max(id) FROM n1", db=DB).split("|"))
        assert n1_count == n1_max and d.n1_before <= n1_max <= d.n1_after, (n1_max, d.n1_before, d.n1_after)
        assert psql_at(port, "SELECT count(*) FROM n2", db=DB) == "0"
    finally:
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone))
    out = as_postgres([f"{PG_BIN}/pg_isready", "-h", "127.0.0.1", "-p", str(port)])
    assert out.returncode != 0, f"clone {clone} still answers on {port}"


def test_malformed_and_conflicting_targets_are_refused(instance, client, destroyed):
    d = destroyed
    meta = f'[{{"type":"db","name":"{DB}","tables":[{{"type":"table","name":"t1","newname":"never"}}]}}]'

    def refused(code, action="RestoreTable", **params):
        extra = {"TableMeta": meta} if action == "RestoreTable" else {}
        e = h.expect_error(code, 400, h.call, client, action, DBInstanceId=instance.id, **extra, **params)
        return e.message

    for bad in ("abc", "0", "-1", "+5", "4294967296", "1.5", "0x10"):
        msg = refused("InvalidRestoreTargetXid.Malformed", StrataRestoreTargetXid=bad)
        assert "1 to 4294967295" in msg, msg
    for bad in ("3000000", "0/", "G/1", "123456789/0", "0/1'; SELECT 1"):
        refused("InvalidRestoreTargetLsn.Malformed", StrataRestoreTargetLsn=bad)
    refused("InvalidRestoreTargetInclusive.Malformed", StrataRestoreTargetXid=d.xid,
            StrataRestoreTargetInclusive="maybe")
    for action in ("RestoreTable", "CloneDBInstance"):
        msg = refused("InvalidParameterCombination", action, StrataRestoreTargetXid=d.xid,
                      RestoreTime=h.fmt_seconds(h.utcnow()))
        assert "RestoreTime" in msg, msg
        refused("InvalidParameterCombination", action, StrataRestoreTargetXid=d.xid,
                StrataRestoreTargetLsn=d.commit_lsn)
        msg = refused("MissingParameter", action, BackupId=d.backup_before,
                      StrataRestoreTargetInclusive="false")
        assert "StrataRestoreTargetXid" in msg, msg
    # Well formed, but never committed in the archived WAL.
    msg = refused("InvalidParameter", StrataRestoreTargetXid="4000000000")
    assert "did not commit in the archived WAL" in msg, msg
    # T committed before the set taken after it ended: that set cannot stop before T.
    msg = refused("InvalidParameter", BackupId=d.backup_after, StrataRestoreTargetXid=d.xid,
                  StrataRestoreTargetInclusive="false")
    assert f"before the end of backup {d.backup_after}" in msg, msg
    # No job was started by any refusal.
    assert not [j for j in h.jobs(client, instance.id)
                if j["TaskAction"] == "RestoreTable" and j["BackupStatus"] == "Failed"]
