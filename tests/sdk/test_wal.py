"""Log backups through the official SDK with both signatures:
DescribeBinlogFiles after real writes and WAL switches, the recoverable
window, and DeleteBackup under RDS's rules with log backup on and off.

The tests of this module run in file order against one instance; each
parametrized run leaves log backup on, as it found it."""

import datetime as dt
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

WAIT = 60


@pytest.fixture(autouse=True)
def log_backup_on(instance, admin):
    """Each test starts with the WAL receiver streaming (WAL written before
    its slot exists is not archived) and leaves log backup on, even when it
    fails half-way."""
    wait_receiver_streaming(admin, instance.id)
    yield
    p = admin.describe_backup_policy(rds.DescribeBackupPolicyRequest(dbinstance_id=instance.id)).body
    if p.enable_backup_log != "1":
        admin.modify_backup_policy(
            rds.ModifyBackupPolicyRequest(
                dbinstance_id=instance.id, backup_policy_mode="LogBackupPolicy", enable_backup_log="True"
            )
        )


def lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def window():
    now = h.utcnow()
    return dict(start_time="2000-01-01T00:00:00Z", end_time=h.fmt_seconds(now + dt.timedelta(days=1)))


def binlogs(client, instance_id, **kw):
    args = {**window(), "page_size": 100, **kw}
    return client.describe_binlog_files(
        rds.DescribeBinlogFilesRequest(dbinstance_id=instance_id, **args)
    ).body


def raw_binlogs(client, instance_id):
    w = window()
    body = h.call(client, "DescribeBinlogFiles", DBInstanceId=instance_id,
                  StartTime=w["start_time"], EndTime=w["end_time"], PageSize=100)
    assert body["TotalRecordCount"] == len(body["Items"]["BinLogFile"]) <= 100, body
    return body["Items"]["BinLogFile"]


def wait_segment(client, instance_id, name, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        body = binlogs(client, instance_id)
        if name in [f.log_file_name for f in body.items.bin_log_file]:
            return body
        if time.monotonic() > deadline:
            pytest.fail(
                f"segment {name} not listed after {timeout}s: "
                f"{[f.log_file_name for f in body.items.bin_log_file]}"
            )
        time.sleep(0.2)


def success_ranges(client, instance_id):
    body = h.call(client, "DescribeBackups", DBInstanceId=instance_id, PageSize=100)
    return {
        b["BackupId"]: (lsn(b["StrataStartLsn"]), lsn(b["StrataStopLsn"]))
        for b in body["Items"]["Backup"]
        if b["BackupStatus"] == "Success"
    }


def wal_and_backups(client, instance_id):
    """For failure messages: the archived WAL and the backups, with LSNs."""
    segs = [
        (f["LogFileName"], f["StrataBeginLsn"], f["StrataEndLsn"], f["LogBeginTime"])
        for f in raw_binlogs(client, instance_id)
    ]
    body = h.call(client, "DescribeBackups", DBInstanceId=instance_id, PageSize=100)
    sets = [
        (b["BackupId"], b["BackupStatus"], b.get("StrataStartLsn"), b.get("StrataStopLsn"), b["BackupEndTime"])
        for b in body["Items"]["Backup"]
    ]
    return {"wal": segs, "backups": sets}


def expected_recovery_begin(client, instance_id):
    """When point-in-time recovery can start, derived from the listings: the
    end of the oldest successful backup that starts inside the gap-free run
    of archived WAL reaching the newest segment."""
    segs = sorted(
        (lsn(f["StrataBeginLsn"]), lsn(f["StrataEndLsn"])) for f in raw_binlogs(client, instance_id)
    )
    run_start, end = None, -1
    for begin, finish in segs:
        if run_start is None or begin > end:
            run_start = begin
        end = max(end, finish)
    assert run_start is not None, "no WAL archived"
    body = h.call(client, "DescribeBackups", DBInstanceId=instance_id, PageSize=100)
    ends = [
        h.parse_time(b["BackupEndTime"])
        for b in body["Items"]["Backup"]
        if b["BackupStatus"] == "Success" and lsn(b["StrataStartLsn"]) >= run_start
    ]
    assert ends, wal_and_backups(client, instance_id)
    return h.fmt_seconds(min(ends))


def overlaps(seg, rng):
    begin, end = lsn(seg["StrataBeginLsn"]), lsn(seg["StrataEndLsn"])
    return begin <= rng[1] and end > rng[0]


def table(instance, sig):
    return "wal_" + instance.id.replace("-", "_") + "_" + sig


def check_listing(body, instance_id):
    files = body.items.bin_log_file
    assert body.total_record_count == len(files) and body.page_record_count == len(files)
    assert body.total_file_size == sum(f.file_size for f in files)
    names = [f.log_file_name for f in files]
    assert names == sorted(names)
    for f in files:
        assert f.host_instance_id == instance_id
        assert len(f.checksum) == 64 and int(f.checksum, 16) >= 0, f.checksum
        assert h.parse_time(f.log_begin_time) <= h.parse_time(f.log_end_time)
        if f.log_file_name.endswith(".partial"):
            assert f.remote_status == "Uploading"
            assert 0 < f.file_size <= h.SEGMENT_SIZE
        else:
            assert len(f.log_file_name) == 24
            assert f.remote_status == "Completed"
            assert f.file_size == h.SEGMENT_SIZE, f.to_map()


def test_binlog_files_after_writes(instance, client, sig):
    before = binlogs(client, instance.id)
    t0 = h.utcnow().replace(microsecond=0)
    name = h.write_and_switch_wal(table(instance, sig))
    body = wait_segment(client, instance.id, name)
    check_listing(body, instance.id)
    # New as a complete segment (retention may meanwhile drop WAL older than
    # the oldest backup, so the totals need not grow).
    assert name not in [f.log_file_name for f in before.items.bin_log_file]
    (seg,) = [f for f in body.items.bin_log_file if f.log_file_name == name]
    # The segment holds our commit: its decoded commit times bracket it.
    assert h.parse_time(seg.log_end_time) >= t0
    assert h.parse_time(seg.log_begin_time) <= h.utcnow()

    # Time window: only segments with commits (or stored) inside it.
    future = h.utcnow() + dt.timedelta(hours=1)
    empty = binlogs(client, instance.id, start_time=h.fmt_seconds(future),
                    end_time=h.fmt_seconds(future + dt.timedelta(hours=1)))
    assert (empty.total_record_count, empty.total_file_size, empty.items.bin_log_file) == (0, 0, [])
    until = h.utcnow() + dt.timedelta(minutes=1)
    recent = binlogs(client, instance.id, start_time=h.fmt_seconds(t0), end_time=h.fmt_seconds(until))
    assert name in [f.log_file_name for f in recent.items.bin_log_file]
    for f in recent.items.bin_log_file:
        assert h.parse_time(f.log_end_time) >= t0 and h.parse_time(f.log_begin_time) <= until, f.to_map()
    older = [f.log_file_name for f in body.items.bin_log_file if h.parse_time(f.log_end_time) < t0]
    assert not set(older) & {f.log_file_name for f in recent.items.bin_log_file}

    # Paging: 30 to 100.
    for size in (30, 31, 100):
        page = binlogs(client, instance.id, page_size=size)
        assert page.page_number == 1
        assert page.page_record_count == min(size, page.total_record_count)
    page2 = binlogs(client, instance.id, page_size=30, page_number=2)
    if page2.total_record_count <= 30:
        assert page2.items.bin_log_file == [] and page2.page_record_count == 0
    for bad in (29, 101, 10):
        h.expect_error("InvalidPageSize.Malformed", 400, binlogs, client, instance.id, page_size=bad)


def test_binlog_files_parameter_errors(instance, client):
    now = h.utcnow()
    h.expect_error(
        "MissingParameter", 400, client.describe_binlog_files,
        rds.DescribeBinlogFilesRequest(dbinstance_id=instance.id, end_time=h.fmt_seconds(now)),
    )
    h.expect_error(
        "MissingParameter", 400, client.describe_binlog_files,
        rds.DescribeBinlogFilesRequest(dbinstance_id=instance.id, start_time=h.fmt_seconds(now)),
    )
    h.expect_error(
        "InvalidStartTime.Format", 400, binlogs, client, instance.id,
        start_time="2026/01/01 00:00:00", end_time=h.fmt_seconds(now),
    )
    h.expect_error(
        "InvalidParameterCombination", 400, binlogs, client, instance.id,
        start_time=h.fmt_seconds(now), end_time=h.fmt_seconds(now - dt.timedelta(hours=1)),
    )
    h.expect_error("InvalidDBInstance.NotFound", 404, binlogs, client, "no-such-instance")


def test_recovery_window(instance, client, sig):
    t0 = h.utcnow().replace(microsecond=0)
    name = h.write_and_switch_wal(table(instance, sig))
    wait_segment(client, instance.id, name)
    r = client.describe_local_available_recovery_time(
        rds.DescribeLocalAvailableRecoveryTimeRequest(dbinstance_id=instance.id)
    ).body
    assert r.dbinstance_id == instance.id
    assert r.recovery_begin_time and r.recovery_end_time, r.to_map()
    begin, end = h.parse_time(r.recovery_begin_time), h.parse_time(r.recovery_end_time)
    assert begin <= end
    # It begins when a backup became consistent and reaches the WAL just stored.
    assert r.recovery_begin_time == expected_recovery_begin(client, instance.id), (
        r.to_map(), wal_and_backups(client, instance.id)
    )
    assert r.recovery_begin_time == h.describe_backups(
        client, instance.id, backup_id=instance.first_job["BackupId"]
    ).items.backup[0].backup_end_time, "log backup was on since the first backup"
    assert t0 <= end <= h.utcnow()


def test_delete_refused_while_inside_log_retention(instance, client):
    job = h.backup(client, instance.id)
    for ids in (job.backup_id, f"{instance.first_job['BackupId']},{job.backup_id}"):
        e = h.expect_error(
            "IncorrectBackupSetState", 403, client.delete_backup,
            rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=ids),
        )
        assert "log backup" in e.data["Message"]
    listed = h.describe_backups(client, instance.id, page_size=100).items.backup
    ids = [b.backup_id for b in listed]
    assert job.backup_id in ids and instance.first_job["BackupId"] in ids
    assert all(b.store_status == "Disabled" for b in listed)
    h.expect_error(
        "InvalidBackupId.Malformed", 400, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=",".join(str(i) for i in range(101))),
    )
    h.expect_error(
        "InvalidBackupSetID.NotFound", 404, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=f"{job.backup_id},42"),
    )
    assert job.backup_id in [b.backup_id for b in h.describe_backups(client, instance.id).items.backup]


def wait_receiver_streaming(client, instance_id, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        attr = h.call(client, "DescribeDBInstanceAttribute", DBInstanceId=instance_id)
        state = attr["Items"]["DBInstanceAttribute"][0]["StrataWalReceiver"]
        if state == "Streaming":
            return
        assert time.monotonic() < deadline, f"WAL receiver still {state!r} after {timeout}s"
        time.sleep(0.2)


def set_log_backup(client, instance_id, on, sig):
    # Every spelling RDS accepts: True/False with one signature, 1/0 with the other.
    value = ("True" if on else "False") if sig == "v3" else ("1" if on else "0")
    resp = client.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(
            dbinstance_id=instance_id, backup_policy_mode="LogBackupPolicy", enable_backup_log=value
        )
    ).body
    assert resp.enable_backup_log == ("1" if on else "0")
    p = client.describe_backup_policy(rds.DescribeBackupPolicyRequest(dbinstance_id=instance_id)).body
    assert (p.enable_backup_log, p.backup_log) == (("1", "Enable") if on else ("0", "Disabled"))


def test_log_backup_off_keeps_only_needed_wal_and_allows_delete(instance, client, sig):
    older = h.backup(client, instance.id)
    newest = h.backup(client, instance.id)
    # WAL after the newest backup: no backup needs it.
    names = [h.write_and_switch_wal(table(instance, sig)) for _ in range(2)]
    wait_segment(client, instance.id, names[-1])
    before = raw_binlogs(client, instance.id)
    assert set(names) <= {f["LogFileName"] for f in before}

    set_log_backup(client, instance.id, False, sig)
    after_body = binlogs(client, instance.id)
    check_listing(after_body, instance.id)
    after = raw_binlogs(client, instance.id)
    after_names = {f["LogFileName"] for f in after}
    assert len(after) < len(before), (len(after), len(before))
    assert not set(names) & after_names, "WAL no backup needs was kept"
    ranges = success_ranges(client, instance.id)
    assert {newest.backup_id, older.backup_id, instance.first_job["BackupId"]} <= set(ranges)
    for seg in after:
        assert any(overlaps(seg, r) for r in ranges.values()), f"kept but not needed: {seg}"
    for backup_id, r in ranges.items():
        assert any(overlaps(seg, r) for seg in after), f"WAL of backup {backup_id} was deleted"

    r = client.describe_local_available_recovery_time(
        rds.DescribeLocalAvailableRecoveryTimeRequest(dbinstance_id=instance.id)
    ).body
    assert (r.recovery_begin_time, r.recovery_end_time) == ("", ""), r.to_map()
    attr = h.call(client, "DescribeDBInstanceAttribute", DBInstanceId=instance.id)
    assert attr["Items"]["DBInstanceAttribute"][0]["StrataWalReceiver"] == "Off"
    slot = "strata_" + instance.id.replace("-", "_")
    assert h.psql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == "0"
    # Nothing is archived any more.
    ignored = h.write_and_switch_wal(table(instance, sig))
    time.sleep(2)
    assert ignored not in [f.log_file_name for f in binlogs(client, instance.id).items.bin_log_file]

    # With log backup off any finished backup set can be deleted, even a
    # fresh one, except the newest successful one: it goes only with its
    # instance, or nothing could be restored.
    listed = h.describe_backups(client, instance.id, page_size=100).items.backup
    assert {b.backup_id: b.store_status for b in listed} == {
        b.backup_id: "Disabled" if b.backup_id == newest.backup_id else "Enabled" for b in listed
    }, [b.to_map() for b in listed]
    e = h.expect_error(
        "IncorrectBackupSetState", 403, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=newest.backup_id),
    )
    assert "newest successful backup set" in e.data["Message"], e.data
    h.expect_error(
        "IncorrectBackupSetState", 403, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=f"{older.backup_id},{newest.backup_id}"),
    )
    resp = client.delete_backup(
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=older.backup_id)
    )
    assert resp.status_code == 200 and resp.body.request_id
    gone = h.describe_backups(client, instance.id, backup_id=older.backup_id)
    assert gone.total_record_count == "0" and gone.items.backup == []
    ids = [b.backup_id for b in h.describe_backups(client, instance.id, page_size=100).items.backup]
    assert older.backup_id not in ids
    assert newest.backup_id in ids and instance.first_job["BackupId"] in ids
    h.expect_error(
        "InvalidBackupSetID.NotFound", 404, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=older.backup_id),
    )
    # The next retention pass drops the WAL only the deleted backup needed.
    remaining = success_ranges(client, instance.id)
    only_older = {
        f["LogFileName"] for f in after
        if overlaps(f, ranges[older.backup_id]) and not any(overlaps(f, r) for r in remaining.values())
    }
    deadline = time.monotonic() + 30
    while True:
        now_names = {f["LogFileName"] for f in raw_binlogs(client, instance.id)}
        if not only_older & now_names:
            break
        assert time.monotonic() < deadline, f"WAL of the deleted backup still listed: {only_older & now_names}"
        time.sleep(0.5)
    for seg in raw_binlogs(client, instance.id):
        assert any(overlaps(seg, r) for r in remaining.values()), f"kept but not needed: {seg}"

    # Back on: archiving resumes (at the scheduler's next round), and a new
    # backup opens a new recoverable window.
    set_log_backup(client, instance.id, True, sig)
    wait_receiver_streaming(client, instance.id)
    name = h.write_and_switch_wal(table(instance, sig))
    wait_segment(client, instance.id, name)
    fresh = h.backup(client, instance.id)
    name = h.write_and_switch_wal(table(instance, sig))
    wait_segment(client, instance.id, name)
    r = client.describe_local_available_recovery_time(
        rds.DescribeLocalAvailableRecoveryTimeRequest(dbinstance_id=instance.id)
    ).body
    (b,) = h.describe_backups(client, instance.id, backup_id=fresh.backup_id).items.backup
    # From the new backup at the latest; earlier when the server still had the
    # WAL of the pause and the receiver archived it on resuming (no gap).
    assert r.recovery_begin_time == expected_recovery_begin(client, instance.id), (
        r.to_map(), wal_and_backups(client, instance.id)
    )
    begin, end = h.parse_time(r.recovery_begin_time), h.parse_time(r.recovery_end_time)
    assert begin <= h.parse_time(b.backup_end_time) <= end
    h.expect_error(
        "IncorrectBackupSetState", 403, client.delete_backup,
        rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=fresh.backup_id),
    )
