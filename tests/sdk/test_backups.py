"""Backups, backup tasks and instances through the official SDK, each call
signed with V3 and with V2; the read-only key; the validation errors of
these actions."""

import datetime as dt
import time

import pytest
from alibabacloud_rds20140815 import models as rds
from alibabacloud_tea_openapi.exceptions import ClientException

import helpers as h

TASK_STATES = ("NoStart", "Preparing", "Waiting", "Uploading", "Checking", "Finished", "Failed")


def test_registration_starts_an_automatic_first_backup(instance, client):
    reg = instance.registration
    assert reg["DBInstanceId"] == instance.id
    assert reg["EngineVersion"] == "15"
    assert reg["StrataSystemIdentifier"].isdigit()
    first = instance.first_job
    assert first["BackupStatus"] == "Finished", first
    assert first["JobMode"] == "Automated"
    assert first["Process"] == "100%"
    body = h.describe_backups(client, instance.id, backup_id=first["BackupId"])
    assert body.total_record_count == "1"
    (b,) = body.items.backup
    assert (b.backup_id, b.backup_mode, b.backup_status) == (first["BackupId"], "Automated", "Success")
    assert b.backup_initiator == "System"
    assert b.dbinstance_id == instance.id
    assert b.backup_size > 0


def test_create_backup_runs_to_finished_and_is_listed(instance, client, sig):
    before = h.utcnow().replace(microsecond=0)
    resp = client.create_backup(
        rds.CreateBackupRequest(dbinstance_id=instance.id, backup_method="Physical")
    )
    job_id = resp.body.backup_job_id
    assert job_id.isdigit() and resp.body.request_id
    job = h.wait_job(client, instance.id, job_id)
    assert job.backup_status == "Finished"
    assert job.backup_progress_status == "Finished"
    assert job.process == "100%"
    assert job.job_mode == "Manual"
    assert job.task_action == "NormalBackupTask"
    assert job.backup_id.isdigit()
    raw = h.jobs(client, instance.id, BackupJobId=job_id)
    assert len(raw) == 1 and "StrataErrorMessage" not in raw[0], raw
    assert h.parse_time(raw[0]["StrataStartTime"]) >= before
    assert h.parse_time(raw[0]["StrataEndTime"]) >= h.parse_time(raw[0]["StrataStartTime"])

    body = h.describe_backups(client, instance.id, backup_id=job.backup_id)
    assert (body.total_record_count, body.page_record_count, body.page_number) == ("1", "1", "1")
    (b,) = body.items.backup
    assert b.backup_id == job.backup_id
    assert b.dbinstance_id == instance.id
    assert b.host_instance_id == instance.id
    assert b.backup_status == "Success"
    assert b.backup_mode == "Manual"
    assert b.backup_initiator == "User"
    assert b.backup_method == "Physical"
    assert b.backup_type == "FullBackup"
    assert b.engine == "PostgreSQL" and b.engine_version == "15"
    assert b.backup_size > 1_000_000, "a PostgreSQL 15 data directory is more than 1 MB"
    assert b.is_avail == 1
    start = h.parse_time(b.backup_start_time)
    end = h.parse_time(b.backup_end_time)
    assert before <= start <= end <= h.utcnow()
    assert b.consistent_time == int(end.timestamp())
    assert h.parse_time(b.expect_expire_time) == end + dt.timedelta(days=7)
    # Inside the log retention window with log backup on: not deletable yet.
    assert b.store_status == "Disabled"


def test_describe_backups_filters_and_paging(instance, client):
    manual = h.backup(client, instance.id)
    everything = h.describe_backups(client, instance.id)
    total = int(everything.total_record_count)
    ids = [b.backup_id for b in everything.items.backup]
    assert total == len(ids) >= 2
    assert ids[0] == manual.backup_id, "newest first"
    assert instance.first_job["BackupId"] in ids
    assert everything.total_ecs_snapshot_size > 0

    def listed(**kw):
        body = h.describe_backups(client, instance.id, **kw)
        assert int(body.page_record_count) == len(body.items.backup)
        return [b.backup_id for b in body.items.backup], body

    got, _ = listed(backup_mode="Manual")
    assert manual.backup_id in got and instance.first_job["BackupId"] not in got
    got, _ = listed(backup_mode="Automated")
    assert got == [instance.first_job["BackupId"]]
    got, _ = listed(backup_status="Success")
    assert got == ids
    got, body = listed(backup_status="Failed")
    assert got == [] and body.total_record_count == "0"
    got, _ = listed(backup_type="FullBackup")
    assert got == ids
    got, _ = listed(backup_id=manual.backup_id)
    assert got == [manual.backup_id]

    (m,) = h.describe_backups(client, instance.id, backup_id=manual.backup_id).items.backup
    started = h.parse_time(m.backup_start_time)
    minute = started.replace(second=0)
    got, _ = listed(start_time=h.fmt_minutes(minute), end_time=h.fmt_minutes(minute + dt.timedelta(minutes=1)))
    assert manual.backup_id in got
    later = minute + dt.timedelta(minutes=2)
    got, body = listed(start_time=h.fmt_minutes(later), end_time=h.fmt_minutes(later + dt.timedelta(hours=1)))
    assert got == [] and body.total_record_count == "0"

    for size in (30, 50, 100):
        got, body = listed(page_size=size, page_number=1)
        assert got == ids and body.total_record_count == str(total)
    got, body = listed(page_size=30, page_number=2)
    assert got == [] and body.page_number == "2" and body.total_record_count == str(total)

    for bad in (40, 10, 0):
        h.expect_error(
            "InvalidPageSize.Malformed", 400, h.describe_backups, client, instance.id, page_size=bad
        )
    h.expect_error(
        "InvalidPageNumber.Malformed", 400, h.describe_backups, client, instance.id, page_number=0
    )
    h.expect_error(
        "InvalidStartTime.Format", 400, h.describe_backups, client, instance.id,
        start_time="yesterday", end_time=h.fmt_minutes(h.utcnow()),
    )
    now = h.utcnow()
    h.expect_error(
        "InvalidParameterCombination", 400, h.describe_backups, client, instance.id,
        start_time=h.fmt_minutes(now), end_time=h.fmt_minutes(now - dt.timedelta(hours=1)),
    )


def test_describe_backup_tasks_filters(instance, client):
    job = h.backup(client, instance.id)
    all_jobs = h.jobs(client, instance.id)
    assert all_jobs[0]["BackupJobId"] == job.backup_job_id, "newest first"
    for j in all_jobs:
        assert j["BackupStatus"] in TASK_STATES and j["BackupProgressStatus"] == j["BackupStatus"]
        assert j["Process"].endswith("%")
    ids = lambda **kw: [j["BackupJobId"] for j in h.jobs(client, instance.id, **kw)]
    assert ids(BackupMode="Automated") == [instance.first_job["BackupJobId"]]
    assert job.backup_job_id in ids(BackupMode="Manual")
    assert instance.first_job["BackupJobId"] not in ids(BackupMode="Manual")
    assert job.backup_job_id in ids(BackupJobStatus="Finished")
    assert ids(BackupJobStatus="Failed") == []
    assert ids(BackupJobStatus="Progressing") == []

    typed = client.describe_backup_tasks(
        rds.DescribeBackupTasksRequest(dbinstance_id=instance.id, backup_job_id=job.backup_job_id)
    ).body
    assert [j.backup_job_id for j in typed.items.backup_job] == [job.backup_job_id]
    assert typed.items.backup_job[0].backup_id == job.backup_id


def test_refusals_while_a_backup_runs(instance, client):
    # A backup of a small database takes a checkpoint and a few hundred
    # milliseconds; on a busy machine it can still end before the calls
    # below reach the server. Such a round proves nothing: try another.
    for _ in range(10):
        job_id = client.create_backup(rds.CreateBackupRequest(dbinstance_id=instance.id)).body.backup_job_id
        running = h.jobs(client, instance.id, BackupJobStatus="Progressing")
        refused = None
        if running:
            (running,) = running
            assert running["BackupJobId"] == job_id and running["BackupStatus"] in h.IN_PROGRESS, running
            try:
                extra = client.create_backup(rds.CreateBackupRequest(dbinstance_id=instance.id))
            except ClientException as e:
                refused = e
            else:
                # The first ended in between: wait for the second as well.
                h.wait_job(client, instance.id, extra.body.backup_job_id)
        if refused is not None:
            assert (refused.code, refused.status_code) == ("IncorrectDBInstanceState", 403), refused.message
            if running["BackupId"]:
                try:
                    client.delete_backup(
                        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=running["BackupId"])
                    )
                except ClientException as e:
                    assert (e.code, e.status_code) == ("IncorrectDBInstanceState", 403), e.message
                else:
                    # Only possible once the backup has finished: it was
                    # deleted as a finished one, so the job says Finished.
                    assert h.wait_job(client, instance.id, job_id).backup_status == "Finished"
                    continue
        job = h.wait_job(client, instance.id, job_id)
        assert job.backup_status == "Finished"
        assert h.jobs(client, instance.id, BackupJobStatus="Progressing") == []
        (b,) = h.describe_backups(client, instance.id, backup_id=job.backup_id).items.backup
        assert b.backup_status == "Success"
        if refused is not None:
            return
    pytest.fail("ten backups in a row ended before the next call reached the server")


def test_deregistering_during_a_backup_cancels_it():
    admin = h.make_client("v3", *h.admin_key())
    iid = h.new_instance_id("cancel")
    h.register(admin, iid)
    h.wait_first_backup(admin, iid)
    # A small database backs up in well under a second: a job that was
    # still queued when asked, then done before it was seen running, is
    # tried again; the deregistration must come while one runs.
    for _ in range(10):
        job_id = admin.create_backup(rds.CreateBackupRequest(dbinstance_id=iid)).body.backup_job_id
        running = []
        deadline = time.monotonic() + 30
        while not running and time.monotonic() < deadline:
            running = h.jobs(admin, iid, BackupJobStatus="Progressing")
            if running:
                break
            status = h.jobs(admin, iid, BackupJobId=str(job_id))[0]["BackupStatus"]
            if status in ("Finished", "Failed"):
                break
            time.sleep(0.02)
        if running:
            break
    else:
        pytest.fail("ten backups in a row ended before they were seen running")
    (running,) = running
    assert running["BackupJobId"] == job_id, running
    body = h.call(admin, "StrataDeregisterDBInstance", DBInstanceId=iid)
    assert body["DBInstanceId"] == iid
    h.expect_error("InvalidDBInstance.NotFound", 404, admin.describe_backups,
                   rds.DescribeBackupsRequest(dbinstance_id=iid))
    slot = "strata_" + iid.replace("-", "_")
    assert h.psql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == "0"


def test_backup_method_snapshot_is_refused(instance, client):
    # Snapshot: this instance has no agent; Logical: not a method Strata has.
    for method in ("Snapshot", "Logical"):
        h.expect_error(
            "InvalidBackupMethod.NotSupported", 400, client.create_backup,
            rds.CreateBackupRequest(dbinstance_id=instance.id, backup_method=method),
        )
    h.expect_error(
        "InvalidBackupType.Malformed", 400, client.create_backup,
        rds.CreateBackupRequest(dbinstance_id=instance.id, backup_type="Incremental"),
    )
    h.wait_idle(client, instance.id)
    assert h.jobs(client, instance.id, BackupJobStatus="Progressing") == []


def test_unknown_ids_are_404(instance, client):
    h.expect_error(
        "InvalidDBInstance.NotFound", 404, h.describe_backups, client, "no-such-instance"
    )
    h.expect_error(
        "InvalidDBInstance.NotFound", 404, client.create_backup,
        rds.CreateBackupRequest(dbinstance_id="no-such-instance"),
    )
    h.expect_error(
        "InvalidBackupJobId.NotFound", 404, client.describe_backup_tasks,
        rds.DescribeBackupTasksRequest(dbinstance_id=instance.id, backup_job_id="999999"),
    )
    h.expect_error(
        "InvalidBackupSetID.NotFound", 404, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id="123"),
    )
    h.expect_error("MissingParameter", 400, h.call, client, "DescribeBackups")
    h.expect_error("InvalidAction.NotFound", 404, h.call, client, "DescribeNothing")


def test_describe_instances(instance, client):
    body = client.describe_dbinstances(
        rds.DescribeDBInstancesRequest(dbinstance_id=instance.id)
    ).body
    assert body.total_record_count == 1 and body.page_record_count == 1
    (i,) = body.items.dbinstance
    assert i.dbinstance_id == instance.id
    assert i.engine == "PostgreSQL" and i.engine_version == "15"
    assert i.dbinstance_status == "Running"
    assert i.dbinstance_type == "Primary"

    everything = client.describe_dbinstances(rds.DescribeDBInstancesRequest(page_size=100)).body
    assert instance.id in [i.dbinstance_id for i in everything.items.dbinstance]
    other = client.describe_dbinstances(rds.DescribeDBInstancesRequest(engine="MySQL")).body
    assert other.total_record_count == 0 and other.items.dbinstance == []
    h.expect_error(
        "InvalidPageSize.Malformed", 400, client.describe_dbinstances,
        rds.DescribeDBInstancesRequest(page_size=20),
    )

    attr = client.describe_dbinstance_attribute(
        rds.DescribeDBInstanceAttributeRequest(dbinstance_id=instance.id)
    ).body
    (a,) = attr.items.dbinstance_attribute
    assert a.dbinstance_id == instance.id
    assert a.engine == "PostgreSQL" and a.engine_version == "15"
    assert a.connection_string == h.pg_host()
    assert a.port == str(h.pg_port())
    raw = h.call(client, "DescribeDBInstanceAttribute", DBInstanceId=instance.id)
    (r,) = raw["Items"]["DBInstanceAttribute"]
    assert r["StrataSystemIdentifier"] == instance.registration["StrataSystemIdentifier"]
    assert r["StrataWalReceiver"] in ("Streaming", "Starting"), r
    assert r["StrataLastBackupTime"], r
    h.expect_error(
        "InvalidDBInstance.NotFound", 404, client.describe_dbinstance_attribute,
        rds.DescribeDBInstanceAttributeRequest(dbinstance_id="no-such-instance"),
    )
    # An id repeated is described once; more than 30 ids (RDS's limit) are refused before
    # any is looked up, so a long list of one real id costs nothing.
    twice = client.describe_dbinstance_attribute(
        rds.DescribeDBInstanceAttributeRequest(dbinstance_id=f"{instance.id},{instance.id}")
    ).body
    assert [a.dbinstance_id for a in twice.items.dbinstance_attribute] == [instance.id]
    for request, call in [
        (rds.DescribeDBInstanceAttributeRequest, client.describe_dbinstance_attribute),
        (rds.DescribeDBInstancesRequest, client.describe_dbinstances),
    ]:
        h.expect_error(
            "InvalidDBInstanceId.Malformed", 400, call,
            request(dbinstance_id=",".join([instance.id] * 31)),
        )
    # Ids are data: hostile ones name no instance, whatever they look like.
    for bad in ["a=b", "..", "x'y", "pg\nother", "i" * 64]:
        with pytest.raises(Exception) as info:
            client.describe_dbinstance_attribute(
                rds.DescribeDBInstanceAttributeRequest(dbinstance_id=f"{instance.id},{bad}"))
        code = getattr(info.value, "code", "")
        assert code in ("InvalidDBInstance.NotFound", "InvalidDBInstanceId.Malformed"), (bad, info.value)


def test_register_and_deregister(instance, client, sig):
    iid = h.new_instance_id(f"reg{sig}")
    body = h.register(client, iid, DBName="postgres")
    assert body["DBInstanceId"] == iid and body["EngineVersion"] == "15"
    assert body["StrataSystemIdentifier"] == instance.registration["StrataSystemIdentifier"]
    first = h.wait_first_backup(client, iid)
    assert (first["BackupStatus"], first["JobMode"]) == ("Finished", "Automated"), first
    (b,) = h.describe_backups(client, iid).items.backup
    assert (b.backup_id, b.dbinstance_id, b.backup_status) == (first["BackupId"], iid, "Success")
    listed = client.describe_dbinstances(rds.DescribeDBInstancesRequest(dbinstance_id=iid)).body
    assert [i.dbinstance_id for i in listed.items.dbinstance] == [iid]
    h.retire(client, iid)
    listed = client.describe_dbinstances(rds.DescribeDBInstancesRequest(dbinstance_id=iid)).body
    assert listed.total_record_count == 0
    h.expect_error("InvalidDBInstance.NotFound", 404, h.describe_backups, client, iid)
    h.expect_error("InvalidDBInstance.NotFound", 404, h.call, client, "StrataDeregisterDBInstance",
                   DBInstanceId=iid)
    slot = "strata_" + iid.replace("-", "_")
    assert h.psql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == "0"
    # The module's own instance is untouched.
    assert h.describe_backups(client, instance.id).total_record_count != "0"


def test_deregistration_leaves_no_replication_slot():
    """Deregistering with log backup on (the receiver streaming)."""
    admin = h.make_client("v3", *h.admin_key())
    # When the race hits, the slot drop can wait for the new receiver forever.
    hasty = h.make_client("v3", *h.admin_key(), read_timeout_ms=20000)
    leaked = []
    for _ in range(2):
        iid = h.new_instance_id("slot")
        h.register(admin, iid)
        h.wait_first_backup(admin, iid)
        h.deregister(hasty, iid)
        slot = "strata_" + iid.replace("-", "_")
        # Gone, and still gone a scheduler round or two later.
        time.sleep(1.5)
        if h.psql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") != "0":
            leaked.append(slot)
    assert not leaked, f"replication slots left after deregistration: {leaked}"


def test_registration_errors(instance, client):
    h.expect_error("InvalidDBInstanceId.Duplicate", 400, h.register, client, instance.id)
    h.expect_error("InvalidDBInstanceId.Malformed", 400, h.register, client, "bad id/with slash")
    h.expect_error("InvalidPort.Malformed", 400, h.register, client, h.new_instance_id("x"), Port=70000)
    h.expect_error(
        "InvalidSSLMode.Malformed", 400, h.register, client, h.new_instance_id("x"), SSLMode="sometimes"
    )
    h.expect_error("MissingParameter", 400, h.call, client, "StrataRegisterDBInstance",
                   DBInstanceId=h.new_instance_id("x"))
    # A port where nothing listens: the probe fails and nothing is registered.
    gone = h.new_instance_id("gone")
    h.expect_error("Strata.ServerUnreachable", 400, h.register, client, gone, Port=1)
    listed = client.describe_dbinstances(rds.DescribeDBInstancesRequest(page_size=100)).body
    assert gone not in [i.dbinstance_id for i in listed.items.dbinstance]


def test_read_only_key_describes_but_cannot_change(instance, ro_client):
    body = h.describe_backups(ro_client, instance.id)
    assert int(body.total_record_count) >= 1
    pol = ro_client.describe_backup_policy(
        rds.DescribeBackupPolicyRequest(dbinstance_id=instance.id)
    ).body
    assert pol.backup_retention_period >= 7
    assert h.jobs(ro_client, instance.id)
    attr = ro_client.describe_dbinstance_attribute(
        rds.DescribeDBInstanceAttributeRequest(dbinstance_id=instance.id)
    ).body
    assert attr.items.dbinstance_attribute[0].engine_version == "15"

    forbidden = "Forbidden.ReadOnlyAccessKey"
    h.expect_error(forbidden, 403, ro_client.create_backup,
                   rds.CreateBackupRequest(dbinstance_id=instance.id))
    h.expect_error(forbidden, 403, ro_client.modify_backup_policy,
                   rds.ModifyBackupPolicyRequest(dbinstance_id=instance.id, backup_retention_period="30"))
    h.expect_error(forbidden, 403, ro_client.delete_backup,
                   rds.DeleteBackupRequest(dbinstance_id=instance.id,
                                           backup_id=instance.first_job["BackupId"]))
    h.expect_error(forbidden, 403, h.register, ro_client, h.new_instance_id("ro"))
    h.expect_error(forbidden, 403, h.call, ro_client, "StrataDeregisterDBInstance",
                   DBInstanceId=instance.id)
    # Nothing happened: no new job, the policy and the backups unchanged.
    assert h.jobs(ro_client, instance.id, BackupJobStatus="Progressing") == []
    again = ro_client.describe_backup_policy(
        rds.DescribeBackupPolicyRequest(dbinstance_id=instance.id)
    ).body
    assert again.backup_retention_period == pol.backup_retention_period
    assert h.describe_backups(ro_client, instance.id).total_record_count == body.total_record_count


def test_first_backups_of_instances_registered_together_are_distinct():
    admin = h.make_client("v3", *h.admin_key())
    ids = [h.new_instance_id("pair") for _ in range(2)]
    for iid in ids:
        h.register(admin, iid)
    try:
        firsts = [h.wait_first_backup(admin, iid) for iid in ids]
        assert firsts[0]["BackupId"] != firsts[1]["BackupId"], firsts
        for iid, job in zip(ids, firsts):
            listed = h.describe_backups(admin, iid).items.backup
            assert [b.backup_id for b in listed] == [job["BackupId"]], (iid, job)
    finally:
        for iid in ids:
            h.retire(admin, iid)


def test_instance_ids_sharing_a_slot_name_are_refused():
    # Short timeout: with the shared slot, dropping it can wait for the other receiver.
    admin = h.make_client("v3", *h.admin_key(), read_timeout_ms=15000)
    base = h.new_instance_id("punct")
    ids = [base, base.replace("-", "_")]
    h.register(admin, ids[0])
    # The second id would share the first one's replication slot: refused.
    e = h.expect_error("InvalidParameter", 400, h.register, admin, ids[1])
    assert "replication slot" in e.message, e.message
    ids.pop()
    def receiver(iid):
        attr = h.call(admin, "DescribeDBInstanceAttribute", DBInstanceId=iid)
        return attr["Items"]["DBInstanceAttribute"][0]["StrataWalReceiver"]

    try:
        deadline = time.monotonic() + 5
        while True:
            states = [receiver(i) for i in ids]
            if all(s == "Streaming" for s in states):
                break
            assert time.monotonic() < deadline, dict(zip(ids, states))
            time.sleep(0.3)
    finally:
        # The one holding the slot first, or dropping the slot waits for it.
        for iid in sorted(ids, key=lambda i: receiver(i) != "Streaming"):
            h.wait_first_backup(admin, iid)
            h.retire(admin, iid)
