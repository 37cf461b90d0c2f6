"""RecoveryDBInstance and CopyDatabaseBetweenInstances through the official
SDK: databases of a backup set or of a point in time restored into another
instance Strata manages (a clone, its own PostgreSQL server) and into a new
instance holding only them; rows compared with what the backup or the time
held (a later change absent), a taken target name refused with RDS's code
and the target left as it was, a failed copy leaving nothing behind, and
names that would be options or connection strings elsewhere."""

import json
import os
import subprocess
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

PG_BIN = "/usr/lib/postgresql/15/bin"


def qi(name):
    """An SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def conninfo_value(v):
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def psql_in(port, db, sql, host="127.0.0.1"):
    """SQL in database `db` of the server on `port`, whatever the name looks
    like: it travels as a quoted conninfo value, never as an option."""
    conninfo = f"host={conninfo_value(host)} port={port} user=postgres dbname={conninfo_value(db)}"
    cmd = [f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", f"--dbname={conninfo}", "-c", sql]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=120)
    assert out.returncode == 0, f"psql in {db!r} on port {port} failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def source_sql(db, sql):
    return psql_in(h.pg_port(), db, sql, host=h.pg_host())


def databases(port):
    return set(psql_in(port, "postgres", "SELECT datname FROM pg_database").splitlines())


def attribute(client, instance_id):
    body = h.call(client, "DescribeDBInstanceAttribute", DBInstanceId=instance_id)
    return body["Items"]["DBInstanceAttribute"][0]


def wait_status(client, instance_id, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        a = attribute(client, instance_id)
        if a["DBInstanceStatus"] in ("Running", "Failed"):
            return a
        if time.monotonic() > deadline:
            pytest.fail(f"{instance_id} still {a['DBInstanceStatus']} after {timeout}s")
        time.sleep(0.5)


def wait_recoverable_past(client, instance_id, t, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        body = client.describe_local_available_recovery_time(
            rds.DescribeLocalAvailableRecoveryTimeRequest(dbinstance_id=instance_id)
        ).body
        if body.recovery_end_time and h.parse_time(body.recovery_end_time) > t:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"recovery window of {instance_id} never passed {t}: {body.to_map()}")
        time.sleep(0.5)


def create_db(name):
    source_sql("postgres", f"DROP DATABASE IF EXISTS {qi(name)}")
    source_sql("postgres", f"CREATE DATABASE {qi(name)}")


def fill(db, first, last):
    source_sql(db, "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY, note text);"
                   f"INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series({first}, {last}) g;")


def finished(admin, instance_id, job_id, status="Finished"):
    done = h.wait_job(admin, instance_id, job_id, timeout=240)
    assert done.backup_status == status, h.jobs(admin, instance_id, BackupJobId=job_id)
    return h.jobs(admin, instance_id, BackupJobId=job_id)[0]


class Source:
    """The registered instance, a database with 300 rows in backup set
    `backup_id`, 200 more committed after it; and `time`, a point between
    the two halves of a second database."""


@pytest.fixture(scope="module")
def source(instance, admin):
    s = Source()
    s.id = instance.id
    create_db("rc_set")
    fill("rc_set", 1, 300)
    s.backup_id = h.backup(admin, instance.id).backup_id
    fill("rc_set", 301, 500)
    create_db("rc_time")
    fill("rc_time", 1, 300)
    time.sleep(1.2)
    s.time = h.utcnow().replace(microsecond=0)
    time.sleep(1.2)
    fill("rc_time", 301, 500)
    source_sql("postgres", "SELECT pg_switch_wal()")
    wait_recoverable_past(admin, instance.id, s.time)
    return s


@pytest.fixture(scope="module")
def target(instance, admin):
    """Another instance Strata manages: a clone of the first backup, with a
    database of its own whose name the tests try to take."""
    clone_id = admin.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, backup_id=instance.first_job["BackupId"])).body.dbinstance_id
    a = wait_status(admin, clone_id)
    assert a["DBInstanceStatus"] == "Running", a
    port = int(a["Port"])
    psql_in(port, "postgres", "CREATE DATABASE taken")
    psql_in(port, "taken", "CREATE TABLE mine (v text); INSERT INTO mine VALUES ('kept');")
    yield clone_id, port
    h.wait_idle(admin, clone_id)
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone_id))


def test_recovery_of_a_backup_set_into_another_instance(source, target, admin, sig):
    client = h.make_client(sig, *h.admin_key())
    target_id, port = target
    new = f"rc_set_{sig}"
    # The set names its instance: DBInstanceId may be left out.
    resp = client.recovery_dbinstance(rds.RecoveryDBInstanceRequest(
        backup_id=source.backup_id, target_dbinstance_id=target_id,
        db_names=json.dumps({"rc_set": new})))
    assert resp.body.dbinstance_id == target_id
    job = [j for j in h.jobs(admin, source.id) if j["TaskAction"] == "RecoveryDBInstance"][0]
    item = finished(admin, source.id, job["BackupJobId"])
    assert item["BackupId"] == source.backup_id and target_id in item["StrataDetail"], item
    # The set's rows, not the 200 committed after it.
    assert psql_in(port, new, "SELECT count(*), max(id) FROM ledger") == "300|300"
    assert source_sql("rc_set", "SELECT count(*) FROM ledger") == "500"
    assert psql_in(port, "taken", "SELECT v FROM mine") == "kept"


def test_copy_between_instances_at_a_point_in_time(source, target, admin, sig):
    client = h.make_client(sig, *h.admin_key())
    target_id, port = target
    new = f"rc_time_{sig}"
    client.copy_database_between_instances(rds.CopyDatabaseBetweenInstancesRequest(
        dbinstance_id=source.id, target_dbinstance_id=target_id,
        restore_time=h.fmt_seconds(source.time), sync_user_privilege="NO",
        db_names=json.dumps({"rc_time": new})))
    job = [j for j in h.jobs(admin, source.id)
           if j["TaskAction"] == "CopyDatabaseBetweenInstances"][0]
    finished(admin, source.id, job["BackupJobId"])
    assert psql_in(port, new, "SELECT count(*), max(id) FROM ledger") == "300|300"
    assert not [d for d in databases(port) if d.startswith("strata_restore_")]


def test_recovery_to_a_new_instance_holds_only_the_named_databases(source, admin):
    body = h.call(admin, "RecoveryDBInstance", DBInstanceId=source.id,
                  RestoreTime=h.fmt_seconds(source.time), PayType="Postpaid",
                  DBInstanceClass="pg.n2.small.1",
                  DbNames=json.dumps({"rc_time": "rc_time_new", "rc_set": "rc_set"}))
    new_id = body["DBInstanceId"]
    assert new_id and new_id != source.id
    a = wait_status(admin, new_id)
    assert a["DBInstanceStatus"] == "Running", a
    assert a["StrataSourceDBInstanceId"] == source.id
    port = int(a["Port"])
    try:
        finished(admin, source.id, body["StrataJobId"])
        on_new = databases(port)
        assert {"rc_time_new", "rc_set", "postgres"} <= on_new, on_new
        assert "rc_time" not in on_new and "taken" not in on_new, on_new
        assert psql_in(port, "rc_time_new", "SELECT count(*), max(id) FROM ledger") == "300|300"
        # rc_set at that time: all 500 rows were committed before it.
        assert psql_in(port, "rc_set", "SELECT count(*) FROM ledger") == "500"
    finally:
        h.wait_idle(admin, new_id)
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=new_id))


def test_taken_names_and_bad_requests_change_nothing(source, target, client):
    target_id, port = target
    before = databases(port)
    t = h.fmt_seconds(source.time)
    h.expect_error("InvalidDBName.Duplicate", 400, client.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id=target_id, restore_time=t,
                       db_names='{"rc_time":"taken"}'))
    h.expect_error("InvalidDBName.Duplicate", 400, client.recovery_dbinstance,
                   rds.RecoveryDBInstanceRequest(
                       backup_id=source.backup_id, target_dbinstance_id=target_id,
                       db_names="taken"))
    h.expect_error("InvalidDBName.Duplicate", 400, client.recovery_dbinstance,
                   rds.RecoveryDBInstanceRequest(
                       backup_id=source.backup_id, db_names='{"rc_set":"template1"}'))
    h.expect_error("InvalidDbNames.Malformed", 400, client.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id=target_id, restore_time=t,
                       db_names='{"rc_time":"a","rc_time":"b"}'))
    h.expect_error("InvalidDBName.Format", 400, client.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id=target_id, restore_time=t,
                       db_names=json.dumps({"rc_time": "x" * 64})))
    h.expect_error("InvalidSyncUserPrivilege.NotSupported", 400,
                   client.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id=target_id, restore_time=t,
                       sync_user_privilege="YES", db_names='{"rc_time":"rc_priv"}'))
    h.expect_error("MissingParameter", 400, client.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id=target_id,
                       db_names='{"rc_time":"rc_none"}'))
    h.expect_error("MissingParameter", 400, client.recovery_dbinstance,
                   rds.RecoveryDBInstanceRequest(restore_time=t, db_names="rc_time"))
    h.expect_error("InvalidDBInstance.NotFound", 404, client.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id="pgc-nosuch", restore_time=t,
                       db_names='{"rc_time":"rc_lost"}'))
    h.expect_error("InvalidBackupSetID.NotFound", 404, client.recovery_dbinstance,
                   rds.RecoveryDBInstanceRequest(
                       dbinstance_id=target_id, backup_id=source.backup_id,
                       target_dbinstance_id=target_id, db_names='{"rc_set":"rc_other"}'))
    read_only = h.make_client("v3", *h.read_only_key())
    h.expect_error("Forbidden.ReadOnlyAccessKey", 403, read_only.copy_database_between_instances,
                   rds.CopyDatabaseBetweenInstancesRequest(
                       dbinstance_id=source.id, target_dbinstance_id=target_id, restore_time=t,
                       db_names='{"rc_time":"rc_ro"}'))
    h.expect_error("Forbidden.ReadOnlyAccessKey", 403, read_only.recovery_dbinstance,
                   rds.RecoveryDBInstanceRequest(backup_id=source.backup_id, db_names="rc_set"))
    assert databases(port) == before
    assert psql_in(port, "taken", "SELECT string_agg(v, ',') FROM mine") == "kept"
    assert psql_in(port, "taken", "SELECT count(*) FROM pg_class WHERE relname = 'ledger'") == "0"


def test_a_failed_restore_leaves_nothing_behind(source, admin):
    # rc_priv grants to a role dropped after the backup: into the source
    # itself grants are restored, so its load fails after rc_set's succeeded.
    source_sql("postgres", "DROP ROLE IF EXISTS rc_gone")
    source_sql("postgres", "CREATE ROLE rc_gone")
    create_db("rc_priv")
    fill("rc_priv", 1, 5)
    source_sql("rc_priv", "GRANT SELECT ON ledger TO rc_gone")
    backup_id = h.backup(admin, source.id).backup_id
    source_sql("rc_priv", "REVOKE SELECT ON ledger FROM rc_gone")
    source_sql("postgres", "DROP ROLE rc_gone")
    before = set(source_sql("postgres", "SELECT datname FROM pg_database").splitlines())
    body = h.call(admin, "RecoveryDBInstance", DBInstanceId=source.id, BackupId=backup_id,
                  TargetDBInstanceId=source.id,
                  DbNames=json.dumps({"rc_set": "rc_half", "rc_priv": "rc_priv_copy"}))
    assert body["DBInstanceId"] == source.id
    item = finished(admin, source.id, body["StrataJobId"], status="Failed")
    assert "rc_gone" in item["StrataErrorMessage"], item
    after = set(source_sql("postgres", "SELECT datname FROM pg_database").splitlines())
    assert after == before


def test_a_new_instance_lacking_a_named_database_fails_and_stops(source, admin):
    body = h.call(admin, "RecoveryDBInstance", BackupId=source.backup_id,
                  DbNames="rc_set,never_there")
    new_id = body["DBInstanceId"]
    a = wait_status(admin, new_id)
    try:
        assert a["DBInstanceStatus"] == "Failed", a
        assert "never_there" in a["StrataErrorMessage"], a
        item = finished(admin, source.id, body["StrataJobId"], status="Failed")
        assert "never_there" in item["StrataErrorMessage"], item
        ready = [f"{PG_BIN}/pg_isready", "-h", "127.0.0.1", "-p", a["Port"]]
        if os.geteuid() == 0:
            ready = ["runuser", "-u", "postgres", "--"] + ready
        out = subprocess.run(ready, capture_output=True, text=True, cwd="/tmp", timeout=30)
        assert out.returncode != 0, f"{new_id} still answers on {a['Port']}"
    finally:
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=new_id))


HOSTILE = [
    ("-d", "host=127.0.0.1 port=1 dbname=postgres"),
    ("dbname=template1 user=nobody", "-rc_new"),
    ("a'b\"c;DROP DATABASE taken", "postgresql://evil/x"),
]


def test_hostile_database_names_are_only_names(instance, target, admin, sig):
    client = h.make_client(sig, *h.admin_key())
    target_id, port = target
    for src, _ in HOSTILE:
        create_db(src)
        fill(src, 1, 7)
    job = h.backup(admin, instance.id)
    suffix = f"_{sig}"
    mapping = {src: new + suffix for src, new in HOSTILE}
    client.copy_database_between_instances(rds.CopyDatabaseBetweenInstancesRequest(
        dbinstance_id=instance.id, target_dbinstance_id=target_id, backup_id=job.backup_id,
        db_names=json.dumps(mapping)))
    copy = [j for j in h.jobs(admin, instance.id)
            if j["TaskAction"] == "CopyDatabaseBetweenInstances"][0]
    finished(admin, instance.id, copy["BackupJobId"])
    on_target = databases(port)
    for new in mapping.values():
        assert new in on_target, on_target
        assert psql_in(port, new, "SELECT count(*), sum(id) FROM ledger") == "7|28"
    assert psql_in(port, "taken", "SELECT v FROM mine") == "kept"
    # Into a new instance, renamed there.
    new_db = "-x=" + sig
    body = h.call(client, "RecoveryDBInstance", BackupId=job.backup_id,
                  DbNames=json.dumps({HOSTILE[0][0]: new_db}))
    a = wait_status(admin, body["DBInstanceId"])
    try:
        assert a["DBInstanceStatus"] == "Running", a
        new_port = int(a["Port"])
        on_new = databases(new_port)
        assert new_db in on_new and HOSTILE[0][0] not in on_new, on_new
        assert psql_in(new_port, new_db, "SELECT count(*) FROM ledger") == "7"
    finally:
        h.wait_idle(admin, body["DBInstanceId"])
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=body["DBInstanceId"]))
