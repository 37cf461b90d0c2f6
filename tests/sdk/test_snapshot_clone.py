"""CloneDBInstance of a snapshot backup still on the database host, through
the official SDK: the instance is registered with its agent, a snapshot
backup is taken with CreateBackup, and the clone made from it runs on the
database host (the agent's clone directory), listed by DescribeDBInstances,
with the rows of the backup; DeleteDBInstance removes it there. A clone of
a snapshot set can also stop just before a transaction.

The Rust harness (crates/strata/tests/api.rs) runs PostgreSQL on an XFS
loop file system with `strata agent` next to it and sets STRATA_AGENT_URL,
STRATA_AGENT_KEY (the key file's hex) and STRATA_AGENT_CLONE_DIR."""

import os
import subprocess
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

PG_BIN = "/usr/lib/postgresql/15/bin"


def psql_at(port, sql):
    cmd = [f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
           "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-c", sql]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=60)
    assert out.returncode == 0, f"psql on port {port} failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def listed(client, instance_id):
    """The instance as DescribeDBInstances lists it (raw JSON), or None."""
    body = h.call(client, "DescribeDBInstances")
    found = [i for i in body["Items"]["DBInstance"] if i["DBInstanceId"] == instance_id]
    return found[0] if found else None


def wait_listed_running(client, instance_id, timeout=180):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        item = listed(client, instance_id)
        assert item is not None, f"{instance_id} not listed"
        if not seen or seen[-1] != item["DBInstanceStatus"]:
            seen.append(item["DBInstanceStatus"])
        if item["DBInstanceStatus"] in ("Running", "Failed"):
            assert item["DBInstanceStatus"] == "Running", item
            return item, seen
        if time.monotonic() > deadline:
            pytest.fail(f"{instance_id} not running after {timeout}s: {seen}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_a_snapshot_backup_clones_on_the_database_host(sig):
    admin = h.make_client("v3", *h.admin_key())
    client = h.make_client(sig, *h.admin_key())
    clone_dir = h.env("STRATA_AGENT_CLONE_DIR")
    instance_id = h.new_instance_id(f"snap{sig}")
    body = h.register(admin, instance_id,
                      AgentUrl=h.env("STRATA_AGENT_URL"), AgentKey=h.env("STRATA_AGENT_KEY"))
    assert body["StrataAgentUrl"] == h.env("STRATA_AGENT_URL"), body
    h.wait_first_backup(admin, instance_id)

    table = f"snap_ledger_{sig}"
    h.psql(f"CREATE TABLE {table} AS SELECT g AS id FROM generate_series(1, 300) g")
    resp = admin.create_backup(
        rds.CreateBackupRequest(dbinstance_id=instance_id, backup_method="Snapshot"))
    job = h.wait_job(admin, instance_id, resp.body.backup_job_id)
    assert job.backup_status == "Finished", h.jobs(admin, instance_id)
    backup_id = job.backup_id
    sets = h.call(admin, "DescribeBackups", DBInstanceId=instance_id)["Items"]["Backup"]
    snap = [b for b in sets if b["BackupId"] == backup_id]
    assert snap and snap[0]["BackupMethod"] == "Snapshot" and snap[0]["StrataSnapshotLocal"], sets
    # Rows committed after the backup are not in its clone.
    h.psql(f"INSERT INTO {table} SELECT g FROM generate_series(301, 500) g")

    clone_id = client.clone_dbinstance(
        rds.CloneDBInstanceRequest(dbinstance_id=instance_id, backup_id=backup_id)
    ).body.dbinstance_id
    assert clone_id and clone_id != instance_id
    item, seen = wait_listed_running(client, clone_id)
    assert seen[0] in ("Creating", "Running"), seen
    assert item["StrataCreatedByStrata"] is True, item
    assert item["StrataSourceDBInstanceId"] == instance_id, item
    assert item["StrataAgentClone"] == clone_id, item
    assert item["StrataDataDirectory"] == os.path.join(clone_dir, clone_id), item
    assert os.path.isfile(os.path.join(clone_dir, clone_id, "PG_VERSION"))
    port = int(item["Port"])
    assert psql_at(port, f"SELECT count(*), max(id) FROM {table}") == "300|300"
    assert psql_at(port, "SELECT pg_is_in_recovery()") == "f"
    tasks = [j for j in h.jobs(admin, instance_id) if j["TaskAction"] == "CloneDBInstance"]
    assert tasks and tasks[0]["BackupStatus"] == "Finished", tasks

    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone_id))
    assert listed(admin, clone_id) is None
    assert not os.path.exists(os.path.join(clone_dir, clone_id))
    out = subprocess.run([f"{PG_BIN}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0, f"clone {clone_id} still answers on {port}"
    assert h.psql(f"SELECT count(*) FROM {table}") == "500"
    h.retire(admin, instance_id)


def test_a_snapshot_clone_stops_just_before_a_transaction():
    """The agent's clone recovers from the snapshot set to just before one
    transaction (`xid_before`): the rows it deleted are there, the rows
    inserted after it are not."""
    from test_restore import wait_recoverable_past

    admin = h.make_client("v3", *h.admin_key())
    instance_id = h.new_instance_id("snapxid")
    h.register(admin, instance_id,
               AgentUrl=h.env("STRATA_AGENT_URL"), AgentKey=h.env("STRATA_AGENT_KEY"))
    h.wait_first_backup(admin, instance_id)
    table = "snap_undo"
    h.psql(f"DROP TABLE IF EXISTS {table};"
           f"CREATE TABLE {table} AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 200) g")
    resp = admin.create_backup(
        rds.CreateBackupRequest(dbinstance_id=instance_id, backup_method="Snapshot"))
    job = h.wait_job(admin, instance_id, resp.body.backup_job_id)
    assert job.backup_status == "Finished", h.jobs(admin, instance_id)
    h.psql(f"UPDATE {table} SET note = 'after the snapshot' WHERE id % 5 = 0")
    digest = f"SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM {table} t"
    pre = h.psql(digest)
    out = h.psql(f"BEGIN; DELETE FROM {table}; SELECT 'xid=' || (txid_current() % 4294967296); COMMIT;")
    xid = out.split("xid=")[1].split()[0]
    h.psql(f"INSERT INTO {table} VALUES (1001, 'after the transaction'); SELECT pg_switch_wal();")
    wait_recoverable_past(admin, instance_id, h.utcnow().replace(microsecond=0))

    body = h.call(admin, "CloneDBInstance", DBInstanceId=instance_id, BackupId=job.backup_id,
                  StrataRestoreTargetXid=xid, StrataRestoreTargetInclusive="false")
    clone_id = body["DBInstanceId"]
    item, _ = wait_listed_running(admin, clone_id)
    assert item["StrataAgentClone"] == clone_id, item
    port = int(item["Port"])
    assert psql_at(port, digest) == pre
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone_id))
    assert listed(admin, clone_id) is None
    h.retire(admin, instance_id)
