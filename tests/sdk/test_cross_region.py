"""Cross-region backup through the official SDK: the policy and its refused
values, a new backup and its WAL copied to another region (an encrypted
repository on a real S3 server), the copies listed with their sizes and
times, then the primary repository wiped and new instances restored from
the copies alone (CreateDdrInstance by time and by copied backup set), their
data compared with what was committed at that time.

Run by crates/strata/tests/api.rs with a server whose own region is
cn-hangzhou and whose targets are cn-shanghai (S3, encrypted) and cn-beijing
(a directory); cn-hangzhou is configured as a target too and must not be
offered."""

import os
import shutil
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h
from test_restore import psql_at, psql_db, wait_running

PRIMARY = "cn-hangzhou"
TARGET = "cn-shanghai"
TIMEOUT = 240


def policy(client, instance_id):
    return client.describe_instance_cross_backup_policy(
        rds.DescribeInstanceCrossBackupPolicyRequest(dbinstance_id=instance_id, region_id=PRIMARY)
    ).body


def modify(client, instance_id, **kw):
    return client.modify_instance_cross_backup_policy(
        rds.ModifyInstanceCrossBackupPolicyRequest(dbinstance_id=instance_id, region_id=PRIMARY, **kw)
    ).body


def copies(client, instance_id, **kw):
    return client.describe_cross_region_backups(
        rds.DescribeCrossRegionBackupsRequest(dbinstance_id=instance_id, region_id=PRIMARY, **kw)
    ).body


def wait_for(what, fn, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {timeout}s")
        time.sleep(0.5)


def test_available_regions_and_refused_policies(instance, admin):
    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        regions = client.describe_available_cross_region(
            rds.DescribeAvailableCrossRegionRequest(region_id=PRIMARY)
        ).body.regions.region
        assert regions == ["cn-beijing", TARGET]

    before = policy(admin, instance.id)
    assert (before.backup_enabled, before.log_backup_enabled) == ("Disable", "Disable")
    assert before.region_id == PRIMARY and before.dbinstance_id == instance.id

    ok = dict(cross_backup_region=TARGET, cross_backup_type="1", backup_enabled="1",
              log_backup_enabled="1", retent_type=1)
    for bad in (6, 1826, 0):
        h.expect_error("InvalidRetention.Malformed", 400, modify, admin, instance.id,
                       retention=bad, **ok)
    h.expect_error("InvalidCrossBackupRegion.NotFound", 400, modify, admin, instance.id,
                   **{**ok, "cross_backup_region": "mars-north-1"}, retention=7)
    # The primary's own region is no target, even though it is configured.
    h.expect_error("InvalidCrossBackupRegion.NotFound", 400, modify, admin, instance.id,
                   **{**ok, "cross_backup_region": PRIMARY}, retention=7)
    h.expect_error("InvalidCrossBackupType.Malformed", 400, modify, admin, instance.id,
                   **{**ok, "cross_backup_type": "2"}, retention=7)
    h.expect_error("InvalidRetentType.Malformed", 400, modify, admin, instance.id,
                   **{**ok, "retent_type": 2}, retention=7)
    h.expect_error("InvalidParameterCombination", 400, modify, admin, instance.id,
                   **{**ok, "backup_enabled": "0"}, retention=7)
    # Nothing refused was stored.
    assert policy(admin, instance.id).backup_enabled == "Disable"
    ro = h.make_client("v3", *h.read_only_key())
    h.expect_error("Forbidden.ReadOnlyAccessKey", 403, modify, ro, instance.id, retention=7, **ok)


def test_copies_then_restore_from_them_with_the_primary_wiped(instance, admin):
    body = modify(admin, instance.id, cross_backup_region=TARGET, cross_backup_type="1",
                  backup_enabled="Enable", log_backup_enabled="Enable", retent_type=1,
                  retention=30)
    assert (body.backup_enabled, body.log_backup_enabled) == ("Enable", "Enable")
    assert (body.cross_backup_region, body.retention, body.retent_type) == (TARGET, 30, 1)
    pol = policy(admin, instance.id)
    assert (pol.backup_enabled, pol.log_backup_enabled, pol.retention) == ("Enable", "Enable", 30)
    assert h.parse_time(pol.backup_enabled_time) <= h.utcnow()
    assert pol.engine == "PostgreSQL" and pol.engine_version == "15"

    backup_id = h.backup(admin, instance.id).backup_id
    t = committed_then_more()

    def copied():
        raw = h.call(admin, "DescribeCrossRegionBackups", DBInstanceId=instance.id, RegionId=PRIMARY)
        return [c for c in raw["Items"]["Item"] if c["StrataBackupId"] == backup_id]
    raw_copy = wait_for("the copy of the new backup", copied)[0]
    assert raw_copy["StrataCopiedBytes"] > 0, raw_copy
    # The next usage sample counts what the copy holds in the target region.
    def cross_usage():
        body = h.call(admin, "StrataDescribeBackupStorageUsage", DBInstanceId=instance.id)
        return body if body.get("CrossRegionStoredSize", 0) > 0 else None
    usage = wait_for("the copy in the usage figures", cross_usage)
    assert any(s.get("CrossRegionStoredSize", 0) > 0 for s in usage["Samples"]["Sample"])
    assert usage["TotalStoredSize"] == usage["DataStoredSize"] + usage["LogStoredSize"]
    # Only the set taken after the policy went on is copied.
    first = instance.first_job["BackupId"]
    assert first != backup_id
    assert [c["StrataBackupId"] for c in h.call(
        admin, "DescribeCrossRegionBackups", DBInstanceId=instance.id)["Items"]["Item"]] == [backup_id]
    by_id = copies(admin, instance.id, cross_backup_id=raw_copy["CrossBackupId"])
    assert by_id.total_record_count == 1
    copy = by_id.items.item[0]
    assert isinstance(copy.cross_backup_id, int)
    assert copy.cross_backup_region == TARGET and copy.restore_regions.restore_region == [TARGET]
    assert copy.cross_backup_set_size > 1_000_000, copy.to_map()
    assert h.parse_time(copy.backup_start_time) <= h.parse_time(copy.backup_end_time)
    assert copy.backup_method == "Physical" and copy.engine == "PostgreSQL"

    # The copy's WAL reaches past T.
    def window():
        body = admin.describe_available_recovery_time(rds.DescribeAvailableRecoveryTimeRequest(
            dbinstance_id=instance.id, cross_backup_id=copy.cross_backup_id, region_id=PRIMARY)).body
        return body if body.recovery_end_time and h.parse_time(body.recovery_end_time) > t else None
    w = wait_for("copied WAL past T", window)
    assert w.cross_backup_id == copy.cross_backup_id
    assert h.parse_time(w.recovery_begin_time) == h.parse_time(copy.backup_end_time)

    logs = admin.describe_cross_region_log_backup_files(rds.DescribeCrossRegionLogBackupFilesRequest(
        dbinstance_id=instance.id, region_id=PRIMARY, cross_backup_region=TARGET,
        start_time=h.fmt_seconds(t.replace(hour=0, minute=0, second=0)),
        end_time=h.fmt_seconds(h.utcnow().replace(microsecond=0) + h.dt.timedelta(minutes=1)))).body
    assert logs.total_record_count >= 1 and logs.items.item, logs.to_map()
    for f in logs.items.item:
        assert isinstance(f.cross_log_backup_id, int) and f.cross_backup_region == TARGET
        assert len(f.log_file_name) == 24 and f.cross_log_backup_size > 0
    # The copies' blocks are sealed with the target's own key: no plain row data there.
    cross_dir = h.env("STRATA_CROSS_REPOSITORY")
    assert os.path.isdir(cross_dir)
    for root, _, files in os.walk(cross_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"cross_ledger" not in f.read(), name

    tasks = h.jobs(admin, instance.id)
    copy_tasks = [j for j in tasks if j["TaskAction"] == "CrossRegionBackup"]
    assert copy_tasks and copy_tasks[0]["BackupStatus"] == "Finished", tasks
    assert copy_tasks[0]["BackupId"] == backup_id

    check_ddr_before_restoring(admin, instance.id, t, copy.cross_backup_id)
    listed_with_cross_region_backup(admin, instance.id)

    # Lose the primary repository entirely.
    primary = h.env("STRATA_PRIMARY_REPOSITORY")
    assert os.path.isfile(os.path.join(primary, "strata-repo.json"))
    shutil.rmtree(primary)

    expected = psql_db("postgres", "SELECT count(*), max(id), md5(string_agg(note, ',' ORDER BY id)) "
                                   "FROM cross_ledger WHERE id <= 300")
    v2 = h.make_client("v2", *h.admin_key())
    ddr = v2.create_ddr_instance(rds.CreateDdrInstanceRequest(
        restore_type="BackupTime", restore_time=h.fmt_seconds(t),
        source_dbinstance_name=instance.id, source_region=PRIMARY, region_id=TARGET,
        engine="PostgreSQL", engine_version="15", dbinstance_class="pg.n2.small.1",
        dbinstance_storage=20, dbinstance_net_type="Intranet", pay_type="Postpaid")).body
    assert ddr.dbinstance_id and ddr.dbinstance_id != instance.id and int(ddr.port) > 0
    a, _ = wait_running(admin, ddr.dbinstance_id)
    assert int(a["Port"]) == int(ddr.port) and a["StrataSourceDBInstanceId"] == instance.id
    got = psql_at(int(ddr.port), "SELECT count(*), max(id), md5(string_agg(note, ',' ORDER BY id)) "
                                 "FROM cross_ledger")
    assert got == expected and got.startswith("300|300|"), (got, expected)
    ddr_tasks = [j for j in h.jobs(admin, instance.id) if j["TaskAction"] == "CreateDdrInstance"]
    assert ddr_tasks and ddr_tasks[0]["BackupStatus"] == "Finished", ddr_tasks

    # By the copied set alone: the ledger did not exist when it was taken.
    by_set = admin.create_ddr_instance(rds.CreateDdrInstanceRequest(
        restore_type="BackupSet", backup_set_id=str(copy.cross_backup_id), region_id=TARGET,
        engine="PostgreSQL", pay_type="Postpaid", dbinstance_net_type="Intranet")).body
    a2, _ = wait_running(admin, by_set.dbinstance_id)
    assert psql_at(int(a2["Port"]), "SELECT to_regclass('cross_ledger') IS NULL") == "t"

    # Refusals.
    h.expect_error("InvalidRestoreTime", 400, admin.create_ddr_instance, rds.CreateDdrInstanceRequest(
        restore_type="BackupTime", restore_time=h.fmt_seconds(t.replace(year=t.year - 1)),
        source_dbinstance_name=instance.id, source_region=PRIMARY, region_id=TARGET,
        engine="PostgreSQL"))
    h.expect_error("InvalidSourceRegion.NotFound", 400, admin.create_ddr_instance,
                   rds.CreateDdrInstanceRequest(
                       restore_type="BackupTime", restore_time=h.fmt_seconds(t),
                       source_dbinstance_name=instance.id, source_region="cn-beijing",
                       region_id=TARGET, engine="PostgreSQL"))
    h.expect_error("InvalidBackupSetID.NotFound", 400, admin.create_ddr_instance,
                   rds.CreateDdrInstanceRequest(restore_type="BackupSet", backup_set_id="987654321",
                                                region_id=TARGET, engine="PostgreSQL"))
    h.expect_error("InvalidRestoreType.Malformed", 400, admin.create_ddr_instance,
                   rds.CreateDdrInstanceRequest(restore_type="Yesterday", region_id=TARGET))

    # Turning the policy off stops copying; the copies stay until their retention ends.
    off = modify(admin, instance.id, backup_enabled="Disable")
    assert (off.backup_enabled, off.log_backup_enabled) == ("Disable", "Disable")
    assert copy.cross_backup_id in [c.cross_backup_id for c in copies(admin, instance.id).items.item]
    assert cross_instances(admin, dbinstance_id=instance.id).total_records == 0

    for ddr_id in (ddr.dbinstance_id, by_set.dbinstance_id):
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=ddr_id))


def committed_then_more():
    """Commits 300 rows, notes a time T after them, commits 200 more and
    switches WAL (copies hold complete segments); returns T."""
    psql_db("postgres", "CREATE TABLE cross_ledger (id int PRIMARY KEY, note text);"
                        "INSERT INTO cross_ledger SELECT g, md5(g::text) FROM generate_series(1, 300) g;")
    time.sleep(1.2)
    t = h.utcnow().replace(microsecond=0)
    time.sleep(1.2)
    psql_db("postgres", "INSERT INTO cross_ledger SELECT g, md5(g::text) FROM generate_series(301, 500) g;"
                        "SELECT pg_switch_wal();")
    return t


def check_ddr(client, **kw):
    args = dict(region_id=TARGET, engine="PostgreSQL", engine_version="15.0",
                dbinstance_class="pg.n2.small.1", dbinstance_storage=20)
    return client.check_create_ddr_dbinstance(
        rds.CheckCreateDdrDBInstanceRequest(**{**args, **kw})).body


def check_ddr_before_restoring(admin, instance_id, t, cross_backup_id):
    """CheckCreateDdrDBInstance: a time inside the copies' window and the
    copied set are possible; a time before any copy and an unknown set are
    not, and say why; malformed requests are refused."""
    by_time = dict(restore_type="1", source_dbinstance_name=instance_id, source_region=PRIMARY)
    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        ok = check_ddr(client, restore_time=h.fmt_seconds(t), **by_time)
        assert ok.is_valid == "true" and ok.request_id, ok.to_map()
        assert check_ddr(client, restore_type="0", backup_set_id=str(cross_backup_id)).is_valid == "true"
        # A check only reads: a read-only key may ask it.
        ro = h.make_client(sig, *h.read_only_key())
        assert check_ddr(ro, restore_type="0", backup_set_id=str(cross_backup_id)).is_valid == "true"

        raw = h.call(client, "CheckCreateDdrDBInstance", RegionId=TARGET, Engine="PostgreSQL",
                     RestoreType="1", SourceDBInstanceName=instance_id, SourceRegion=PRIMARY,
                     RestoreTime=h.fmt_seconds(t.replace(year=t.year - 1)))
        assert raw["IsValid"] == "false", raw
        assert raw["StrataReason"].startswith("InvalidRestoreTime:"), raw
        raw = h.call(client, "CheckCreateDdrDBInstance", RegionId=TARGET, Engine="PostgreSQL",
                     RestoreType="0", BackupSetId="987654321")
        assert raw["IsValid"] == "false" and "987654321" in raw["StrataReason"], raw
        # Another major version than the copies'.
        raw = h.call(client, "CheckCreateDdrDBInstance", RegionId=TARGET, Engine="PostgreSQL",
                     EngineVersion="14.0", RestoreType="0", BackupSetId=str(cross_backup_id))
        assert raw["IsValid"] == "false" and "PostgreSQL 15" in raw["StrataReason"], raw
        # The other region holds no copies of this instance.
        raw = h.call(client, "CheckCreateDdrDBInstance", RegionId="cn-beijing", Engine="PostgreSQL",
                     RestoreType="1", SourceDBInstanceName=instance_id, SourceRegion=PRIMARY,
                     RestoreTime=h.fmt_seconds(t))
        assert raw["IsValid"] == "false" and raw["StrataReason"], raw

    h.expect_error("InvalidRestoreType.Malformed", 400, check_ddr, admin, restore_type="2")
    h.expect_error("MissingParameter", 400, check_ddr, admin, restore_type="0")
    h.expect_error("MissingParameter", 400, check_ddr, admin, restore_type="1",
                   restore_time=h.fmt_seconds(t), source_region=PRIMARY)
    h.expect_error("InvalidRestoreTime.Format", 400, check_ddr, admin,
                   restore_time="yesterday\r\nX: 1", **by_time)
    h.expect_error("InvalidBackupSetID.Malformed", 400, check_ddr, admin, restore_type="0",
                   backup_set_id="1 OR 1=1")
    h.expect_error("InvalidEngineVersion.Malformed", 400, check_ddr, admin, engine_version="fifteen",
                   restore_type="0", backup_set_id=str(cross_backup_id))
    h.expect_error("InvalidEngine.Malformed", 400, check_ddr, admin, engine="MySQL",
                   restore_time=h.fmt_seconds(t), **by_time)
    h.expect_error("InvalidSourceRegion.NotFound", 400, check_ddr, admin, restore_type="1",
                   source_dbinstance_name=instance_id, source_region="cn-beijing",
                   restore_time=h.fmt_seconds(t))
    h.expect_error("InvalidDBInstance.NotFound", 404, check_ddr, admin, restore_type="1",
                   source_dbinstance_name="no-such-instance", source_region=PRIMARY,
                   restore_time=h.fmt_seconds(t))


def cross_instances(client, **kw):
    return client.describe_cross_region_backup_dbinstance(
        rds.DescribeCrossRegionBackupDBInstanceRequest(**{"region_id": PRIMARY, **kw})).body


def listed_with_cross_region_backup(admin, instance_id):
    """DescribeCrossRegionBackupDBInstance lists the instance with its
    policy, as DescribeInstanceCrossBackupPolicy describes it."""
    pol = policy(admin, instance_id)
    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        body = cross_instances(client)
        assert body.region_id == PRIMARY and body.request_id
        assert (body.total_records, body.items_numbers, body.page_number, body.page_size) == (1, 1, 1, 30)
        [item] = body.items.item
        assert (item.dbinstance_id, item.cross_backup_region, item.cross_backup_type) == (
            instance_id, TARGET, "1")
        assert (item.backup_enabled, item.log_backup_enabled) == ("Enable", "Enable")
        assert (item.retent_type, item.retention) == (1, 30)
        assert (item.backup_enabled_time, item.log_backup_enabled_time) == (
            pol.backup_enabled_time, pol.log_backup_enabled_time)
        assert (item.engine, item.engine_version, item.dbinstance_status, item.lock_mode) == (
            "PostgreSQL", "15", "Running", "Unlock")
        # By id, among others (up to 30); another instance has none.
        assert cross_instances(client, dbinstance_id=f"pg-other,{instance_id}").total_records == 1
        assert cross_instances(client, dbinstance_id="pg-other").items.item == []
        past = cross_instances(client, page_number=2, page_size=30)
        assert past.items.item == [] and past.total_records == 1

    h.expect_error("MissingParameter", 400, admin.describe_cross_region_backup_dbinstance,
                   rds.DescribeCrossRegionBackupDBInstanceRequest())
    h.expect_error("InvalidRegionId.NotFound", 400, cross_instances, admin, region_id=TARGET)
    h.expect_error("InvalidDBInstanceId.Malformed", 400, cross_instances, admin,
                   dbinstance_id=",".join(f"pg-{i}" for i in range(31)))
    for bad in (0, 29, 101):
        h.expect_error("InvalidPageSize.Malformed", 400, cross_instances, admin, page_size=bad)
    ro = h.make_client("v3", *h.read_only_key())
    assert cross_instances(ro).total_records == 1
