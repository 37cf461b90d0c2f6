"""ModifyBackupPolicy / DescribeBackupPolicy through the official SDK with
both signatures: stored values, the next backup time computed here from the
clock, and every validation error with its code (the policy unchanged)."""

import datetime as dt

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h


def describe(client, instance_id, mode=None):
    return client.describe_backup_policy(
        rds.DescribeBackupPolicyRequest(dbinstance_id=instance_id, backup_policy_mode=mode)
    ).body


def modify(client, instance_id, **kw):
    return client.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(dbinstance_id=instance_id, **kw)
    ).body


def snapshot(p):
    return (
        p.preferred_backup_period,
        p.preferred_backup_time,
        p.backup_retention_period,
        p.log_backup_retention_period,
        p.enable_backup_log,
        p.backup_log,
    )


KEEP_DEFAULT_POLICY = True  # see conftest.instance


def test_default_policy(instance, client):
    asked = h.utcnow()
    p = describe(client, instance.id)
    days = p.preferred_backup_period.split(",")
    assert len(days) == 2 and all(d in h.WEEKDAYS for d in days)
    assert days == sorted(days, key=h.WEEKDAYS.index)
    start, end = p.preferred_backup_time.split("-")
    s = dt.datetime.strptime(start, "%H:%MZ")
    assert end == f"{(s.hour + 1) % 24:02d}:{s.minute:02d}Z", p.preferred_backup_time
    assert p.backup_retention_period == 7
    assert p.log_backup_retention_period == 7
    assert (p.enable_backup_log, p.backup_log) == ("1", "Enable")
    assert p.backup_method == "Physical"
    # Computed around the call (a window may start meanwhile).
    expected = {
        h.fmt_minutes(h.next_window(days, s.hour, s.minute, t)) for t in (asked, h.utcnow())
    }
    assert p.preferred_next_backup_time in expected, (p.preferred_next_backup_time, expected)
    assert describe(client, instance.id, "LogBackupPolicy").log_backup_retention_period == 7


# (days from today, window start hour relative to now): whole hours at least
# one hour away from now, so the server's clock and ours agree on the answer.
CASES = [
    pytest.param((0, 3), +2, id="today-later"),
    pytest.param((0, 4), -2, id="today-passed"),
    pytest.param((1, 5), +1, id="tomorrow"),
    pytest.param((2, 6), -3, id="in-two-days"),
]


@pytest.mark.parametrize("day_offsets,hour_offset", CASES)
def test_modify_moves_next_backup_time(instance, client, day_offsets, hour_offset):
    before = describe(client, instance.id)
    now = h.utcnow()
    days = [h.WEEKDAYS[(now.weekday() + d) % 7] for d in day_offsets]
    hour = (now.hour + hour_offset) % 24
    window = f"{hour:02d}:00Z-{(hour + 1) % 24:02d}:00Z"
    # Lower-case and out of order on purpose: stored in week order.
    period = ",".join(d.lower() for d in reversed(days))
    resp = modify(
        client,
        instance.id,
        backup_policy_mode="DataBackupPolicy",
        preferred_backup_period=period,
        preferred_backup_time=window,
        backup_retention_period=str(20 + day_offsets[1]),
    )
    assert resp.dbinstance_id == instance.id
    assert resp.enable_backup_log == "1"

    p = describe(client, instance.id)
    after = h.utcnow()
    assert p.preferred_backup_period == ",".join(sorted(days, key=h.WEEKDAYS.index))
    assert p.preferred_backup_time == window
    assert p.backup_retention_period == 20 + day_offsets[1]
    assert p.log_backup_retention_period == before.log_backup_retention_period
    expected = h.next_window(days, hour, 0, now)
    assert expected == h.next_window(days, hour, 0, after)
    assert p.preferred_next_backup_time == h.fmt_minutes(expected)
    # Sanity of the expectation itself: on a chosen day, in the future, and
    # today exactly when today's window is still ahead.
    assert h.WEEKDAYS[expected.weekday()] in days and expected >= now
    today_ahead = day_offsets[0] == 0 and now.replace(hour=hour, minute=0, second=0, microsecond=0) >= now
    assert (expected.date() == now.date()) == today_ahead
    # No automatic backup was owed by the change.
    assert h.jobs(client, instance.id, BackupJobStatus="Progressing") == []


def test_modify_log_policy(instance, client):
    modify(client, instance.id, backup_retention_period="60")
    resp = modify(
        client, instance.id, backup_policy_mode="LogBackupPolicy", log_backup_retention_period="45"
    )
    assert resp.enable_backup_log == "1"
    p = describe(client, instance.id, "LogBackupPolicy")
    assert (p.log_backup_retention_period, p.backup_retention_period) == (45, 60)
    # Equal to the data retention is allowed.
    modify(client, instance.id, backup_policy_mode="LogBackupPolicy", log_backup_retention_period="60")
    assert describe(client, instance.id).log_backup_retention_period == 60
    # Both bounds.
    modify(client, instance.id, backup_retention_period="730", log_backup_retention_period="7")
    p = describe(client, instance.id)
    assert (p.backup_retention_period, p.log_backup_retention_period) == (730, 7)
    modify(client, instance.id, backup_retention_period="7")
    assert describe(client, instance.id).backup_retention_period == 7


INVALID = [
    pytest.param(dict(preferred_backup_period="Monday"), "InvalidPreferredBackupPeriod.Malformed", id="one-day"),
    pytest.param(dict(preferred_backup_period="Monday,Monday"), "InvalidPreferredBackupPeriod.Malformed", id="same-day-twice"),
    pytest.param(dict(preferred_backup_period="Monday,Funday"), "InvalidPreferredBackupPeriod.Malformed", id="unknown-day"),
    pytest.param(dict(preferred_backup_time="02:00Z-04:00Z"), "InvalidPreferredBackupTime.Malformed", id="two-hours"),
    pytest.param(dict(preferred_backup_time="02:00-03:00"), "InvalidPreferredBackupTime.Malformed", id="no-Z"),
    pytest.param(dict(preferred_backup_time="25:00Z-26:00Z"), "InvalidPreferredBackupTime.Malformed", id="hour-25"),
    pytest.param(dict(backup_retention_period="6"), "InvalidBackupRetentionPeriod.Malformed", id="data-6"),
    pytest.param(dict(backup_retention_period="731"), "InvalidBackupRetentionPeriod.Malformed", id="data-731"),
    pytest.param(dict(backup_retention_period="week"), "InvalidBackupRetentionPeriod.Malformed", id="data-word"),
    pytest.param(dict(backup_policy_mode="LogBackupPolicy", log_backup_retention_period="6"),
                 "InvalidLogBackupRetentionPeriod.Malformed", id="log-6"),
    pytest.param(dict(backup_retention_period="730", log_backup_retention_period="7301"),
                 "InvalidLogBackupRetentionPeriod.Malformed", id="log-7301"),
    pytest.param(dict(backup_retention_period="10", log_backup_retention_period="20"),
                 "InvalidParameterCombination", id="log-above-data"),
    pytest.param(dict(backup_policy_mode="LogBackupPolicy", log_backup_retention_period="8"),
                 "InvalidParameterCombination", id="log-above-stored-data"),
    pytest.param(dict(backup_policy_mode="LogBackupPolicy", enable_backup_log="maybe"),
                 "InvalidEnableBackupLog.Malformed", id="enable-maybe"),
    pytest.param(dict(backup_policy_mode="EverythingPolicy"), "InvalidBackupPolicyMode.Malformed", id="mode"),
    # An instance without an agent cannot take snapshots.
    pytest.param(dict(category="Flash"), "InvalidBackupMethod.NotSupported", id="flash"),
    pytest.param(dict(backup_method="Snapshot"), "InvalidBackupMethod.NotSupported", id="snapshot"),
]


@pytest.mark.parametrize("change,code", INVALID)
def test_invalid_policy_is_refused_and_changes_nothing(instance, client, change, code):
    # A valid combination mixed in must not be applied either.
    mixed = dict(preferred_backup_time="05:00Z-06:00Z")
    if "preferred_backup_time" in change:
        mixed = dict(preferred_backup_period="Tuesday,Friday")
    modify(client, instance.id, backup_retention_period="7", log_backup_retention_period="7")
    before = snapshot(describe(client, instance.id))
    e = h.expect_error(code, 400, modify, client, instance.id, **{**mixed, **change})
    assert e.data["Code"] == code
    assert snapshot(describe(client, instance.id)) == before


def test_policy_errors_on_unknown_instance(client):
    h.expect_error("InvalidDBInstance.NotFound", 404, describe, client, "no-such-instance")
    h.expect_error(
        "InvalidDBInstance.NotFound", 404, modify, client, "no-such-instance", backup_retention_period="8"
    )
    h.expect_error("MissingParameter", 400, h.call, client, "DescribeBackupPolicy")
