"""Backup storage usage through the official SDK: the extension action
StrataDescribeBackupStorageUsage (called with the SDK's generic call_api),
DescribeBackups' TotalEcsSnapshotSize and Encryption, signed with V3 and V2.
The server runs with `[usage] free_quota = "1KiB"` and an hour between
samples, so every sample is over the quota and a new one is taken only
after a change (a backup and the garbage collection that follows it)."""

import datetime as dt
import json
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

QUOTA = 1024
GIB = 1 << 30


def usage(client, instance_id, **query):
    return h.call(client, "StrataDescribeBackupStorageUsage", DBInstanceId=instance_id, **query)


def settled_usage(client, instance_id):
    """The usage once the newest sample counts every successful backup set
    (the sample after a backup is taken at the scheduler's next tick)."""
    deadline = time.monotonic() + 60
    while True:
        sets = h.describe_backups(client, instance_id, backup_status="Success").items.backup
        body = usage(client, instance_id)
        if body["LogicalSize"] == sum(b.backup_size for b in sets):
            return body, sets
        if time.monotonic() > deadline:
            pytest.fail(f"no usage sample with the {len(sets)} sets after 60 s: {body}")
        time.sleep(0.5)


def test_usage_figures_quota_and_describe_backups_agree(instance, client):
    body, sets = settled_usage(client, instance.id)
    assert sets, "the first backup is missing"
    assert body["DBInstanceId"] == instance.id
    assert body["DataStoredSize"] > 0 and body["LogStoredSize"] > 0, body
    assert body["TotalStoredSize"] == body["DataStoredSize"] + body["LogStoredSize"]
    # Deduplicated and compressed: less stored than the sets' data.
    assert body["DataStoredSize"] < body["LogicalSize"], body
    assert (body["FreeQuotaRule"], body["FreeQuota"]) == ("1024", QUOTA)
    assert body["ExcessSize"] == body["TotalStoredSize"] - QUOTA
    assert body["Samples"]["Sample"], body
    assert body["Samples"]["Sample"][-1]["SampleTime"] == body["SampleTime"]
    for s in body["Samples"]["Sample"]:
        assert s["TotalStoredSize"] == s["DataStoredSize"] + s["LogStoredSize"]
        assert s["ExcessSize"] == max(0, s["TotalStoredSize"] - s["FreeQuota"])

    # DescribeBackups reads the same newest sample (retried when WAL
    # housekeeping brought a new one between the two calls).
    for _ in range(10):
        listed = h.describe_backups(client, instance.id)
        again = usage(client, instance.id)
        if again["SampleTime"] == body["SampleTime"]:
            break
        body = again
    else:
        pytest.fail("samples kept landing between the calls")
    assert listed.total_ecs_snapshot_size == body["TotalStoredSize"]
    for b in listed.items.backup:
        assert json.loads(b.encryption) == {"Encrypted": False}, b.encryption


def test_a_new_backup_is_sampled_and_billed(instance, client):
    before, _ = settled_usage(client, instance.id)
    h.backup(client, instance.id)
    after, sets = settled_usage(client, instance.id)
    assert after["SampleTime"] >= before["SampleTime"]
    assert after["LogicalSize"] > before["LogicalSize"]
    assert after["DataStoredSize"] > before["DataStoredSize"]
    assert len(sets) >= 2

    # One second inside the newest sample's span: its excess for 1 s. WAL
    # housekeeping after a backup (retention of superseded partial
    # segments, then a collection) may still bring a sample; then the
    # window moves after it.
    for _ in range(10):
        newest = usage(client, instance.id)
        start = h.parse_time(newest["SampleTime"]) + dt.timedelta(seconds=2)
        end = start + dt.timedelta(seconds=1)
        while h.utcnow() <= end + dt.timedelta(milliseconds=200):
            time.sleep(0.2)
        window = usage(client, instance.id, StartTime=h.fmt_seconds(start), EndTime=h.fmt_seconds(end))
        if window["SampleTime"] == newest["SampleTime"]:
            break
    else:
        pytest.fail(f"samples kept landing inside the window: {window}")
    assert window["Samples"]["Sample"] == []
    assert (window["StartTime"], window["EndTime"]) == (h.fmt_seconds(start), h.fmt_seconds(end))
    assert window["BillableGBHours"] == pytest.approx(newest["ExcessSize"] / 3600 / GIB, rel=1e-12)

    # Over the whole history the hours only grow.
    whole = usage(client, instance.id)
    assert whole["BillableGBHours"] >= window["BillableGBHours"] > 0


def test_read_only_key_and_refused_input(instance, ro_client, client):
    body = usage(ro_client, instance.id)
    assert body["DBInstanceId"] == instance.id
    h.expect_error("MissingParameter", 400, h.call, client, "StrataDescribeBackupStorageUsage")
    h.expect_error(
        "InvalidDBInstance.NotFound", 404, usage, client, "sdk-no-such-instance"
    )
    h.expect_error("InvalidStartTime.Format", 400, usage, client, instance.id, StartTime="yesterday")
    h.expect_error(
        "InvalidParameterCombination", 400, usage, client, instance.id,
        StartTime="2026-11-25T10:00Z", EndTime="2026-11-25T09:00Z",
    )


def metric(text, name, **labels):
    """The value of one sample line of /metrics."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    lines = [l for l in text.splitlines() if l.startswith(f"{name}{{{selector}}} ")]
    assert len(lines) == 1, (name, labels, text)
    return float(lines[0].rsplit(" ", 1)[1])


def test_metrics_carry_the_newest_sample(instance, client):
    settled_usage(client, instance.id)
    for _ in range(10):
        body = usage(client, instance.id)
        status, _, text = h.http_get("/metrics")
        if usage(client, instance.id)["SampleTime"] == body["SampleTime"]:
            break
    else:
        pytest.fail("samples kept landing between the calls")
    assert status == 200
    i = instance.id
    assert metric(text, "strata_backup_storage_free_quota_bytes", instance=i) == QUOTA
    assert metric(text, "strata_backup_storage_logical_bytes", instance=i) == body["LogicalSize"]
    assert metric(text, "strata_backup_storage_stored_bytes", instance=i, kind="data") == body["DataStoredSize"]
    assert metric(text, "strata_backup_storage_stored_bytes", instance=i, kind="wal") == body["LogStoredSize"]
    # No cross-region policy: nothing in other regions, outside the total.
    assert body["CrossRegionStoredSize"] == 0
    assert metric(text, "strata_backup_storage_stored_bytes", instance=i, kind="cross_region") == 0
    assert body["TotalStoredSize"] == body["DataStoredSize"] + body["LogStoredSize"]
    assert metric(text, "strata_backup_storage_excess_bytes", instance=i) == body["ExcessSize"]
    assert "# TYPE strata_backup_storage_billable_gb_hours_total counter" in text
    assert metric(text, "strata_backup_storage_billable_gb_hours_total", instance=i) > 0
