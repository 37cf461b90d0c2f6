"""Backup set operations through the official SDK with both signatures:
ModifyBackupSetExpireTime (an expiry moved past the retention keeps the set
when retention decides at a date after it), DescribeLogBackupFiles (the
archived WAL of a time range, as DescribeBinlogFiles lists it) and
DescribeDetachedBackups (sets kept after their instance was deregistered,
listed, cloned with CloneDBInstance and deleted with DeleteBackup), each
with RDS's error codes for
bad and hostile parameters.

Run by crates/strata/tests/api.rs, which also sets STRATA_BIN and
STRATA_CONFIG so the retention dry run can be asked about a later date."""

import datetime as dt
import json
import subprocess
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h
from test_restore import psql_at, psql_db, wait_running
from test_wal import wait_receiver_streaming, wait_segment

REGION = "local"
LOG_WINDOW = dict(StartTime="2000-01-01T00:00:00Z")


def expiry(client, instance_id, backup_id):
    body = h.call(client, "DescribeBackups", DBInstanceId=instance_id, BackupId=backup_id)
    [b] = body["Items"]["Backup"]
    return b


def modify_expiry(client, instance_id, backup_id, when):
    return client.modify_backup_set_expire_time(rds.ModifyBackupSetExpireTimeRequest(
        dbinstance_id=instance_id, backup_id=backup_id, expect_expire_time=when)).body


def retention_at(instance_id, day):
    """The retention decision for `instance_id` as of `day` (the CLI's dry
    run: what a retention run on that day deletes), by backup id."""
    out = subprocess.run(
        [h.env("STRATA_BIN"), "--config", h.env("STRATA_CONFIG"), "repo", "retention",
         "--dry-run", "--json", "--instance", instance_id, "--at", day],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [report] = json.loads(out.stdout)
    return {s["backup_id"]: s for s in report["sets"]}


# ----- ModifyBackupSetExpireTime -----


def test_expiry_moves_later_only(instance, client, sig):
    backup_id = h.backup(client, instance.id).backup_id
    current = h.parse_time(expiry(client, instance.id, backup_id)["ExpectExpireTime"])
    target = (h.utcnow() + dt.timedelta(days=400)).replace(second=0, microsecond=0)

    body = modify_expiry(client, instance.id, int(backup_id), h.fmt_minutes(target))
    assert body.success is True and body.request_id, body.to_map()
    data = json.loads(body.data)
    assert data == {"DBInstanceId": instance.id, "BackupId": backup_id,
                    "ExpectExpireTime": h.fmt_seconds(target)}
    listed = expiry(client, instance.id, backup_id)
    assert h.parse_time(listed["ExpectExpireTime"]) == target > current
    assert listed["StrataKeepUntil"] == h.fmt_seconds(target)
    # Seconds are accepted too, and a later time moves it again.
    later = target + dt.timedelta(days=1, seconds=7)
    modify_expiry(client, instance.id, int(backup_id), h.fmt_seconds(later))
    assert h.parse_time(expiry(client, instance.id, backup_id)["ExpectExpireTime"]) == later

    # Never earlier: not before the current expiry, not in the past.
    for earlier in (h.fmt_minutes(target), "2020-01-01T00:00Z"):
        h.expect_error("InvalidExpectExpireTime", 400, modify_expiry, client, instance.id,
                       int(backup_id), earlier)
    assert h.parse_time(expiry(client, instance.id, backup_id)["ExpectExpireTime"]) == later

    for bad in ("tomorrow", "2027-13-01T00:00Z", "2027-01-01 00:00", "2027-01-01T00:00Z\r\nX: y"):
        h.expect_error("InvalidExpectExpireTime.Format", 400, modify_expiry, client, instance.id,
                       int(backup_id), bad)
    h.expect_error("MissingParameter", 400, modify_expiry, client, instance.id, int(backup_id), None)
    h.expect_error("MissingParameter", 400, modify_expiry, client, instance.id, None,
                   h.fmt_minutes(later))
    h.expect_error("InvalidBackupSetID.NotFound", 404, modify_expiry, client, instance.id, 1,
                   h.fmt_minutes(later))
    h.expect_error("InvalidBackupSetID.NotFound", 404, h.call, client, "ModifyBackupSetExpireTime",
                   DBInstanceId=instance.id, BackupId=f"{backup_id}' OR '1'='1",
                   ExpectExpireTime=h.fmt_minutes(later))
    h.expect_error("InvalidDBInstance.NotFound", 404, modify_expiry, client, "no-such-instance",
                   int(backup_id), h.fmt_minutes(later))
    ro = h.make_client(sig, *h.read_only_key())
    h.expect_error("Forbidden.ReadOnlyAccessKey", 403, modify_expiry, ro, instance.id,
                   int(backup_id), h.fmt_minutes(later + dt.timedelta(days=1)))


def test_extended_set_outlives_its_retention(instance, admin):
    extended = h.backup(admin, instance.id).backup_id
    plain = h.backup(admin, instance.id).backup_id
    h.backup(admin, instance.id)  # the newest, which retention always keeps
    target = (h.utcnow() + dt.timedelta(days=60)).replace(second=0, microsecond=0)
    modify_expiry(admin, instance.id, int(extended), h.fmt_minutes(target))

    # Thirty days on, past the seven days of the regular retention and of
    # the log retention: the plain set goes, the extended one stays.
    month = (h.utcnow() + dt.timedelta(days=30)).strftime("%Y-%m-%d")
    sets = retention_at(instance.id, month)
    assert sets[plain]["delete"] is True, sets[plain]
    assert sets[extended]["delete"] is False, sets[extended]
    assert sets[extended]["kept_by"] == f"kept until {target.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    # After the new expiry, it goes too.
    after = (target + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert retention_at(instance.id, after)[extended]["delete"] is True

    # The API's dry run agrees today: kept, expiring then.
    dry = h.call(admin, "StrataDescribeRetention", DBInstanceId=instance.id)
    [d] = [b for b in dry["Items"]["Backup"] if b["BackupId"] == extended]
    assert (d["StrataAction"], h.parse_time(d["ExpectExpireTime"])) == ("Keep", target)
    # A deletion by hand is refused while it is kept.
    h.expect_error("IncorrectBackupSetState", 403, admin.delete_backup,
                   rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=extended))


# ----- DescribeLogBackupFiles -----


def log_files(client, instance_id, **kw):
    args = {"start_time": LOG_WINDOW["StartTime"],
            "end_time": h.fmt_minutes(h.utcnow() + dt.timedelta(days=1)), **kw}
    return client.describe_log_backup_files(
        rds.DescribeLogBackupFilesRequest(dbinstance_id=instance_id, **args)).body


def test_log_backup_files_are_the_archived_wal_of_the_range(instance, client, sig):
    wait_receiver_streaming(client, instance.id)
    t0 = h.utcnow().replace(microsecond=0) - dt.timedelta(seconds=1)
    name = h.write_and_switch_wal(f"log_files_{sig}")
    wait_segment(client, instance.id, name)
    t1 = h.utcnow().replace(microsecond=0) + dt.timedelta(seconds=1)

    end = h.fmt_seconds(h.utcnow() + dt.timedelta(days=1))
    binlog = h.call(client, "DescribeBinlogFiles", DBInstanceId=instance.id,
                    EndTime=end, PageSize=100, **LOG_WINDOW)
    raw = h.call(client, "DescribeLogBackupFiles", DBInstanceId=instance.id,
                 EndTime=end, PageSize=1000, **LOG_WINDOW)
    files = raw["Items"]["BinLogFile"]
    assert raw["TotalRecordCount"] == len(files) == binlog["TotalRecordCount"] >= 1
    assert raw["TotalFileSize"] == sum(f["FileSize"] for f in files) == binlog["TotalFileSize"]
    as_binlog = [(f["LogFileName"], f["FileSize"], f["LogBeginTime"], f["LogEndTime"], f["Checksum"])
                 for f in binlog["Items"]["BinLogFile"]]
    assert [(f["StrataLogFileName"], f["FileSize"], f["LogBeginTime"], f["LogEndTime"],
             f["StrataChecksum"]) for f in files] == as_binlog
    [switched] = [f for f in files if f["StrataLogFileName"] == name]
    assert switched["FileSize"] == h.SEGMENT_SIZE and switched["StrataPartial"] is False
    assert t0 <= h.parse_time(switched["LogBeginTime"]) <= h.parse_time(switched["LogEndTime"]) <= t1
    assert switched["DownloadLink"] and switched["DownloadLink"] == switched["IntranetDownloadLink"]
    assert h.parse_time(switched["LinkExpiredTime"]) > h.utcnow()

    # Typed: only the window's files; none in a window before any WAL.
    body = log_files(client, instance.id, start_time=h.fmt_seconds(t0), end_time=h.fmt_seconds(t1))
    assert body.total_record_count == body.page_record_count == len(body.items.bin_log_file) >= 1
    assert body.page_number == 1
    assert h.SEGMENT_SIZE in [f.file_size for f in body.items.bin_log_file]
    for f in body.items.bin_log_file:
        assert h.parse_time(f.log_end_time) >= t0 and h.parse_time(f.log_begin_time) <= t1
    empty = log_files(client, instance.id, start_time="2001-01-01T00:00Z", end_time="2001-01-02T00:00Z")
    assert (empty.total_record_count, empty.total_file_size, empty.items.bin_log_file) == (0, 0, [])
    # Past the last page: no files, the totals still counted.
    last = log_files(client, instance.id, page_size=30, page_number=1000)
    assert last.items.bin_log_file == [] and last.total_record_count == raw["TotalRecordCount"]


def test_log_backup_files_parameter_errors(instance, client):
    for bad in (29, 1001, -1):
        h.expect_error("InvalidPageSize.Malformed", 400, log_files, client, instance.id, page_size=bad)
    assert log_files(client, instance.id, page_size=1000).total_record_count >= 0
    h.expect_error("InvalidPageNumber.Malformed", 400, log_files, client, instance.id, page_number=0)
    h.expect_error("MissingParameter", 400, client.describe_log_backup_files,
                   rds.DescribeLogBackupFilesRequest(dbinstance_id=instance.id,
                                                     end_time="2030-01-01T00:00Z"))
    h.expect_error("MissingParameter", 400, client.describe_log_backup_files,
                   rds.DescribeLogBackupFilesRequest(start_time="2000-01-01T00:00Z",
                                                     end_time="2030-01-01T00:00Z"))
    h.expect_error("InvalidParameterCombination", 400, log_files, client, instance.id,
                   start_time="2030-01-01T00:00Z", end_time="2029-01-01T00:00Z")
    h.expect_error("InvalidEndTime.Format", 400, log_files, client, instance.id,
                   end_time="2030-01-01T00:00:00+08:00")
    h.expect_error("InvalidStartTime.Format", 400, log_files, client, instance.id,
                   start_time="'; DROP TABLE wal_segments; --")
    h.expect_error("InvalidDBInstance.NotFound", 404, log_files, client, "../no-such-instance")


# ----- DescribeDetachedBackups -----


def detached(client, **kw):
    return client.describe_detached_backups(rds.DescribeDetachedBackupsRequest(**kw)).body


@pytest.fixture(scope="module")
def gone(admin):
    """An instance registered with a ledger of 123 rows, backed up once,
    then given 10 more rows and deregistered: its set stays, detached."""
    psql_db("postgres", "CREATE TABLE detached_ledger (id int PRIMARY KEY, note text);"
                        "INSERT INTO detached_ledger SELECT g, md5(g::text) FROM generate_series(1, 123) g;")
    expected = psql_db("postgres", "SELECT count(*), md5(string_agg(note, ',' ORDER BY id)) "
                                   "FROM detached_ledger")
    instance_id = h.new_instance_id("gone")
    h.register(admin, instance_id)
    backup_id = h.wait_first_backup(admin, instance_id)["BackupId"]
    psql_db("postgres", "INSERT INTO detached_ledger SELECT g, md5(g::text) FROM generate_series(124, 133) g;")
    h.retire(admin, instance_id)
    return instance_id, backup_id, expected


def test_detached_sets_are_listed(instance, gone, client):
    instance_id, backup_id, _ = gone
    body = detached(client, region=REGION)
    listed = [b for b in body.items.backup if b.backup_id == backup_id]
    assert len(listed) == 1, body.to_map()
    b = listed[0]
    assert (b.dbinstance_id, b.host_instance_id) == (instance_id, instance_id)
    assert (b.backup_status, b.backup_mode, b.backup_type, b.backup_method) == (
        "Success", "Automated", "FullBackup", "Physical")
    assert b.backup_size > 1_000_000 and b.is_avail == 1
    assert h.parse_time(b.backup_start_time) <= h.parse_time(b.backup_end_time)
    assert b.consistent_time == int(h.parse_time(b.backup_end_time).timestamp())
    assert b.backup_download_url and b.store_status == "Enabled"
    # The registered instance's sets are not detached.
    mine = {s.backup_id for s in h.describe_backups(client, instance.id).items.backup}
    assert mine and not mine & {x.backup_id for x in body.items.backup}
    assert body.total_record_count == str(len(body.items.backup)) == body.page_record_count
    assert body.page_number == "1"

    # Filters and paging.
    one = detached(client, region=REGION, dbinstance_id=instance_id)
    assert [x.backup_id for x in one.items.backup] == [backup_id] and one.total_record_count == "1"
    assert detached(client, region=REGION, backup_id=backup_id).total_record_count == "1"
    assert detached(client, region=REGION, dbinstance_id=instance_id,
                    backup_mode="Manual").total_record_count == "0"
    assert detached(client, region=REGION, dbinstance_id=instance_id,
                    backup_status="Failed").total_record_count == "0"
    later = h.fmt_minutes(h.utcnow() + dt.timedelta(minutes=1))
    assert detached(client, region=REGION, dbinstance_id=instance_id,
                    start_time=later).total_record_count == "0"
    past = detached(client, region=REGION, dbinstance_id=instance_id, page_size=50, page_number=2)
    assert past.items.backup == [] and past.total_record_count == "1"


def test_detached_listing_errors(client):
    h.expect_error("MissingParameter", 400, detached, client)
    h.expect_error("InvalidRegionId.NotFound", 400, detached, client, region="cn-hangzhou\r\nX: 1")
    h.expect_error("InvalidPageSize.Malformed", 400, detached, client, region=REGION, page_size=40)
    h.expect_error("InvalidStartTime.Format", 400, detached, client, region=REGION, start_time="yesterday")
    h.expect_error("InvalidParameterCombination", 400, detached, client, region=REGION,
                   start_time="2030-01-02T00:00Z", end_time="2030-01-01T00:00Z")


def test_detached_set_clones(gone, admin):
    instance_id, backup_id, expected = gone
    v2 = h.make_client("v2", *h.admin_key())
    # A detached set restores to its consistency point only.
    h.expect_error("InvalidParameterCombination", 400, v2.clone_dbinstance, rds.CloneDBInstanceRequest(
        dbinstance_id=instance_id, backup_id=backup_id, restore_time=h.fmt_seconds(h.utcnow()),
        pay_type="Postpaid"))
    h.expect_error("InvalidParameterCombination", 400, v2.clone_dbinstance, rds.CloneDBInstanceRequest(
        dbinstance_id=instance_id, restore_time=h.fmt_seconds(h.utcnow()), pay_type="Postpaid"))
    h.expect_error("InvalidBackupSetID.NotFound", 404, v2.clone_dbinstance, rds.CloneDBInstanceRequest(
        dbinstance_id=instance_id, backup_id="1", pay_type="Postpaid"))

    clone_id = v2.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance_id, backup_id=backup_id, pay_type="Postpaid")).body.dbinstance_id
    assert clone_id and clone_id != instance_id
    a, _ = wait_running(admin, clone_id)
    assert a["StrataSourceDBInstanceId"] == instance_id
    got = psql_at(int(a["Port"]), "SELECT count(*), md5(string_agg(note, ',' ORDER BY id)) "
                                  "FROM detached_ledger")
    assert got == expected and got.startswith("123|"), (got, expected)

    # The clone is backed up as any instance; deleted with
    # ReleasedKeepPolicy Lastest, its newest set alone stays, detached.
    older = h.wait_first_backup(admin, clone_id)["BackupId"]
    newest = h.backup(admin, clone_id).backup_id
    h.expect_error("InvalidReleasedKeepPolicy.Malformed", 400, admin.delete_dbinstance,
                   rds.DeleteDBInstanceRequest(dbinstance_id=clone_id, released_keep_policy="Some"))
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone_id,
                                                        released_keep_policy="Lastest"))
    kept = detached(admin, region=REGION, dbinstance_id=clone_id)
    assert [b.backup_id for b in kept.items.backup] == [newest] != [older], kept.to_map()
    # A detached set is deleted by its old instance id; the other instance's stays.
    h.expect_error("InvalidBackupSetID.NotFound", 404, admin.delete_backup,
                   rds.DeleteBackupRequest(dbinstance_id=clone_id, backup_id=backup_id))
    admin.delete_backup(rds.DeleteBackupRequest(dbinstance_id=clone_id, backup_id=newest))
    assert detached(admin, region=REGION, dbinstance_id=clone_id).total_record_count == "0"
    h.expect_error("InvalidDBInstance.NotFound", 404, admin.delete_backup,
                   rds.DeleteBackupRequest(dbinstance_id=clone_id, backup_id=newest))
    # The source's set stays detached too.
    assert detached(admin, region=REGION, backup_id=backup_id).total_record_count == "1"
