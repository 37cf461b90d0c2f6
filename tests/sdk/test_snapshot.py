"""Snapshot backups through the official SDK: an instance registered with its
`strata agent` (AgentUrl/AgentKey), refusals of a wrong or malformed key, an
unreachable agent and a data directory on ext4; CreateBackup with
BackupMethod=Snapshot (a Success set on the database host, uploaded into the
repository in the background); one snapshot kept on the host
(snapshot.keep_local = 1), so retention deletes the older one there once the
newer is uploaded, and the older still restores from the repository; and
Category=Flash, which makes the scheduler's backups snapshots while a
CreateBackup without BackupMethod stays physical.

The Rust harness (crates/strata/tests/api.rs, sdk_snapshot_backups) runs
PostgreSQL on a loop-mounted XFS and sets, besides helpers.py's variables:
STRATA_AGENT_URL, STRATA_AGENT_KEY (hex), STRATA_AGENT_SNAPSHOT_DIR, and
STRATA_EXT4_AGENT_URL/STRATA_EXT4_AGENT_KEY/STRATA_EXT4_DATA_DIR (an agent whose
data directory is on ext4)."""

import datetime as dt
import os
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h
from test_restore import psql_at, wait_running

UPLOAD_TIMEOUT = 120


def agent():
    return h.env("STRATA_AGENT_URL"), h.env("STRATA_AGENT_KEY")


def registered_ids(client):
    body = h.call(client, "DescribeDBInstances")
    return [i["DBInstanceId"] for i in body["Items"]["DBInstance"]]


def backup_item(client, instance_id, backup_id):
    body = h.call(client, "DescribeBackups", DBInstanceId=instance_id, BackupId=backup_id)
    items = body["Items"]["Backup"]
    assert len(items) == 1, body
    return items[0]


def wait_backup(client, instance_id, backup_id, what, cond, timeout=UPLOAD_TIMEOUT):
    """Polls DescribeBackups until `cond(item)`; returns the item."""
    deadline = time.monotonic() + timeout
    while True:
        item = backup_item(client, instance_id, backup_id)
        if cond(item):
            return item
        if time.monotonic() > deadline:
            pytest.fail(f"backup {backup_id}: not {what} after {timeout}s: {item}")
        time.sleep(0.5)


def snapshot_backup(client, instance_id):
    """CreateBackup BackupMethod=Snapshot; returns the finished job."""
    resp = client.create_backup(
        rds.CreateBackupRequest(dbinstance_id=instance_id, backup_method="Snapshot")
    )
    job = h.wait_job(client, instance_id, resp.body.backup_job_id)
    assert job.backup_status == "Finished", h.jobs(client, instance_id, BackupJobId=job.backup_job_id)
    assert job.backup_id, job.to_map()
    return job


def on_host(backup_id):
    return os.path.isdir(os.path.join(h.env("STRATA_AGENT_SNAPSHOT_DIR"), backup_id))


def far_window():
    """A window half a day away, so no automatic backup starts meanwhile."""
    hour = (h.utcnow().hour + 12) % 24
    return f"{hour:02d}:00Z-{(hour + 1) % 24:02d}:00Z"


@pytest.fixture(scope="module")
def snap(admin):
    """The XFS cluster registered with its agent; its automatic first backup
    (physical: the default policy) finished."""
    url, key = agent()
    instance_id = h.new_instance_id("snapshot")
    body = h.register(admin, instance_id, AgentUrl=url, AgentKey=key)
    assert body["StrataAgentUrl"] == url, body
    first = h.wait_first_backup(admin, instance_id)
    assert first["BackupStatus"] == "Finished", first
    admin.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(dbinstance_id=instance_id, preferred_backup_time=far_window())
    )
    yield instance_id
    h.retire(admin, instance_id)


def test_registration_refuses_a_wrong_key_an_unreachable_agent_and_ext4(client):
    url, _ = agent()
    instance_id = h.new_instance_id("snaprefuse")
    e = h.expect_error(
        "InvalidAgentKey.Malformed", 400, h.register, client, instance_id, AgentUrl=url, AgentKey="xyz"
    )
    assert e.data["Message"] == "AgentKey must be the 64 hex digits of the agent's key file", e.data["Message"]
    h.expect_error("MissingParameter", 400, h.register, client, instance_id, AgentUrl=url)
    e = h.expect_error("MissingParameter", 400, h.register, client, instance_id, AgentKey="ab" * 32)
    assert e.data["Message"] == (
        "AgentKey and AgentCaFile go with AgentUrl, the agent's URL, which is not supplied."
    ), e.data["Message"]

    # A well-formed key that is not the agent's: the agent refuses it.
    e = h.expect_error(
        "InvalidParameter", 400, h.register, client, instance_id, AgentUrl=url, AgentKey="ab" * 32
    )
    assert f"agent at {url} refused the credential" in e.data["Message"], e.data["Message"]

    # Plain http off the loopback: refused before any request is sent (answers are not
    # signed, so only TLS vouches for them over a network).
    e = h.expect_error(
        "InvalidParameter", 400, h.register, client, instance_id,
        AgentUrl="http://192.0.2.1:7070", AgentKey="ab" * 32,
    )
    assert e.data["Message"].startswith(
        "agent at http://192.0.2.1:7070: plain http is accepted on the loopback only"
    ), e.data["Message"]

    # Nothing listens there.
    e = h.expect_error(
        "Strata.ServerUnreachable", 400, h.register, client, instance_id,
        AgentUrl="http://127.0.0.1:1", AgentKey="ab" * 32,
    )
    assert "agent at http://127.0.0.1:1 unreachable" in e.data["Message"], e.data["Message"]

    # The right key of an agent whose data directory cannot clone files.
    e = h.expect_error(
        "InvalidParameter", 400, h.register, client, instance_id,
        AgentUrl=h.env("STRATA_EXT4_AGENT_URL"), AgentKey=h.env("STRATA_EXT4_AGENT_KEY"),
    )
    assert e.data["Message"] == (
        f"data directory {h.env('STRATA_EXT4_DATA_DIR')} is on ext4, which cannot clone files; "
        "snapshots need a file system with reflink (XFS made with -m reflink=1, or btrfs)"
    ), e.data["Message"]
    assert instance_id not in registered_ids(client)


def test_one_agent_serves_one_instance(admin, snap):
    url, key = agent()
    other = h.new_instance_id("snapdup")
    e = h.expect_error(
        "InvalidParameter", 400, h.register, admin, other, AgentUrl=url, AgentKey=key
    )
    assert e.data["Message"] == (
        f"agent at {url} already serves instance {snap}; one agent serves one instance"
    ), e.data["Message"]
    assert other not in registered_ids(admin)


def test_snapshot_backup_is_uploaded_in_the_background(admin, snap):
    h.psql("CREATE TABLE IF NOT EXISTS snap_ledger (id int PRIMARY KEY, note text);"
           "INSERT INTO snap_ledger VALUES (1, 'before the first snapshot')")
    job = snapshot_backup(admin, snap)
    backup_id = job.backup_id
    h.psql("INSERT INTO snap_ledger VALUES (2, 'after the first snapshot')")

    item = backup_item(admin, snap, backup_id)
    assert item["BackupMethod"] == "Snapshot", item
    assert item["BackupStatus"] == "Success", item
    assert item["BackupMode"] == "Manual", item
    assert item["StrataSnapshotLocal"] is True, item
    assert isinstance(item["StrataSnapshotLocalSize"], int), item
    assert item["BackupSize"] > 0 and item["StrataFileCount"] > 0, item
    with open(os.path.join(h.env("STRATA_AGENT_SNAPSHOT_DIR"), backup_id, "backup_label")) as f:
        assert f"LABEL: strata snapshot {backup_id}" in f.read()

    # The upload runs in the background, as its own task.
    item = wait_backup(admin, snap, backup_id, "uploaded", lambda i: i["StrataSnapshotUploaded"])
    assert item["StrataSnapshotLocal"] is True, item
    assert item["BackupDownloadURL"], item
    assert item["StrataStoredSize"] > 0, item
    tasks = h.jobs(admin, snap)
    backup_task = [t for t in tasks if t["BackupJobId"] == job.backup_job_id]
    assert backup_task and backup_task[0]["TaskAction"] == "NormalBackupTask", tasks
    uploads = [t for t in tasks if t["TaskAction"] == "StrataSnapshotUpload" and t["BackupId"] == backup_id]
    assert len(uploads) == 1, tasks
    assert uploads[0]["BackupStatus"] == "Finished" and uploads[0]["JobMode"] == "Manual", uploads


def test_an_older_uploaded_snapshot_leaves_the_host_and_restores_from_the_repository(admin, snap):
    items = h.call(admin, "DescribeBackups", DBInstanceId=snap)["Items"]["Backup"]
    first = [i for i in items if i["BackupMethod"] == "Snapshot"]
    assert len(first) == 1 and first[0]["StrataSnapshotUploaded"], items
    first_id = first[0]["BackupId"]
    assert on_host(first_id)

    second_id = snapshot_backup(admin, snap).backup_id
    assert on_host(second_id)
    wait_backup(admin, snap, second_id, "uploaded", lambda i: i["StrataSnapshotUploaded"])
    # keep_local = 1: the older one goes from the host at the next retention round.
    item = wait_backup(admin, snap, first_id, "gone from the host", lambda i: not i["StrataSnapshotLocal"])
    assert not on_host(first_id)
    assert item["BackupStatus"] == "Success" and item["IsAvail"] == 1, item
    assert item["StrataSnapshotUploaded"] is True, item
    assert "StrataSnapshotLocalSize" not in item, item
    assert backup_item(admin, snap, second_id)["StrataSnapshotLocal"] is True
    assert on_host(second_id)

    # The older set now exists only in the repository: a clone from it holds
    # exactly what was committed before it.
    clone = admin.clone_dbinstance(
        rds.CloneDBInstanceRequest(dbinstance_id=snap, backup_id=first_id)
    ).body.dbinstance_id
    a, _ = wait_running(admin, clone)
    assert psql_at(int(a["Port"]), "SELECT string_agg(id::text, ',' ORDER BY id) FROM snap_ledger") == "1"
    h.call(admin, "DeleteDBInstance", DBInstanceId=clone)


def test_category_flash_makes_scheduled_backups_snapshots(admin, snap):
    h.expect_error(
        "InvalidCategory.Malformed", 400, admin.modify_backup_policy,
        rds.ModifyBackupPolicyRequest(dbinstance_id=snap, category="Bogus"),
    )
    h.expect_error(
        "InvalidParameterCombination", 400, h.call, admin, "ModifyBackupPolicy",
        DBInstanceId=snap, Category="Flash", BackupMethod="Physical",
    )
    admin.modify_backup_policy(rds.ModifyBackupPolicyRequest(dbinstance_id=snap, category="Flash"))
    policy = h.call(admin, "DescribeBackupPolicy", DBInstanceId=snap)
    assert (policy["Category"], policy["BackupMethod"]) == ("Flash", "Snapshot"), policy

    # High-frequency snapshots: possible now, returned, and off again (-1); while on, the
    # policy cannot go back to physical backups.
    admin.modify_backup_policy(rds.ModifyBackupPolicyRequest(dbinstance_id=snap, backup_interval="15"))
    assert admin.describe_backup_policy(
        rds.DescribeBackupPolicyRequest(dbinstance_id=snap)
    ).body.backup_interval == "15"
    h.expect_error(
        "InvalidBackupInterval.NotSupported", 400, admin.modify_backup_policy,
        rds.ModifyBackupPolicyRequest(dbinstance_id=snap, category="Standard"),
    )
    admin.modify_backup_policy(rds.ModifyBackupPolicyRequest(dbinstance_id=snap, backup_interval="-1"))
    policy = h.call(admin, "DescribeBackupPolicy", DBInstanceId=snap)
    assert (policy["BackupInterval"], policy["Category"]) == ("-1", "Flash"), policy

    # CreateBackup without BackupMethod is a physical backup whatever the
    # policy (RDS's default); the policy's method is the scheduler's.
    manual = h.backup(admin, snap)
    assert backup_item(admin, snap, manual.backup_id)["BackupMethod"] == "Physical"

    # A window starting at the next minute, every day: the scheduler's backup
    # then is a snapshot.
    before = {i["BackupId"] for i in h.call(admin, "DescribeBackups", DBInstanceId=snap)["Items"]["Backup"]}
    start = (h.utcnow() + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    end = start + dt.timedelta(hours=1)
    admin.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(
            dbinstance_id=snap,
            preferred_backup_period=",".join(h.WEEKDAYS),
            preferred_backup_time=f"{start:%H:%M}Z-{end:%H:%M}Z",
        )
    )
    deadline = time.monotonic() + 180
    while True:
        items = h.call(admin, "DescribeBackups", DBInstanceId=snap)["Items"]["Backup"]
        new = [i for i in items if i["BackupId"] not in before]
        if new and new[0]["BackupStatus"] != "Running":
            break
        if time.monotonic() > deadline:
            pytest.fail(f"no scheduled backup after the window started at {start}: {items}")
        time.sleep(1)
    admin.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(dbinstance_id=snap, preferred_backup_time=far_window())
    )
    assert len(new) == 1, new
    scheduled = new[0]
    assert scheduled["BackupMode"] == "Automated", scheduled
    assert scheduled["BackupMethod"] == "Snapshot", scheduled
    assert scheduled["BackupStatus"] == "Success", scheduled
    assert scheduled["StrataSnapshotLocal"] is True, scheduled
    wait_backup(admin, snap, scheduled["BackupId"], "uploaded", lambda i: i["StrataSnapshotUploaded"])
    tasks = [t for t in h.jobs(admin, snap) if t["BackupId"] == scheduled["BackupId"]]
    assert sorted((t["TaskAction"], t["JobMode"]) for t in tasks) == [
        ("NormalBackupTask", "Automated"), ("StrataSnapshotUpload", "Automated")
    ], tasks

    # Back to Standard.
    h.call(admin, "ModifyBackupPolicy", DBInstanceId=snap, BackupMethod="Physical")
    policy = h.call(admin, "DescribeBackupPolicy", DBInstanceId=snap)
    assert (policy["Category"], policy["BackupMethod"]) == ("Standard", "Physical"), policy


def test_snapshots_need_an_agent(admin):
    instance_id = h.new_instance_id("noagent")
    h.register(admin, instance_id)
    try:
        h.wait_first_backup(admin, instance_id)
        e = h.expect_error(
            "InvalidBackupMethod.NotSupported", 400, admin.modify_backup_policy,
            rds.ModifyBackupPolicyRequest(dbinstance_id=instance_id, category="Flash"),
        )
        assert e.data["Message"].startswith(f"instance {instance_id} has no agent: snapshot backups (Category Flash)"), e.data["Message"]
        assert h.call(admin, "DescribeBackupPolicy", DBInstanceId=instance_id)["Category"] == "Standard"
        e = h.expect_error(
            "InvalidBackupMethod.NotSupported", 400, admin.create_backup,
            rds.CreateBackupRequest(dbinstance_id=instance_id, backup_method="Snapshot"),
        )
        assert e.data["Message"].startswith(f"instance {instance_id} has no agent"), e.data["Message"]
    finally:
        h.retire(admin, instance_id)
