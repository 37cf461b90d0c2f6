"""The advanced backup policy through the official SDK: BackupInterval,
the sparse rules (AdvancedDataPolicies) and log retention
(AdvancedLogPolicies), archived backups and StrataKeepLastBackups
round-trip through ModifyBackupPolicy and DescribeBackupPolicy; every bad
value is refused with its code and changes nothing; a set is kept by hand
and released through the extension actions, shown in DescribeBackups and
the retention dry run."""

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h


def describe(client, instance_id):
    return client.describe_backup_policy(
        rds.DescribeBackupPolicyRequest(dbinstance_id=instance_id)
    ).body


def modify(client, instance_id, **kw):
    return client.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(dbinstance_id=instance_id, **kw)
    ).body


def rule(strategy_id, filter_type, filter_value, days, **kw):
    return rds.ModifyBackupPolicyRequestAdvancedDataPolicies(
        strategy_id=strategy_id,
        filter_type=filter_type,
        filter_value=filter_value,
        retention_type="Days",
        retention_value=days,
        **kw,
    )


def rules(p):
    return [
        (r.strategy_id, r.filter_type, r.filter_value, r.retention_type, r.retention_value)
        for r in p.advanced_data_policies.advanced_data_policy
    ]


def state(client, instance_id):
    """Everything the policy answers but the next backup time (which moves with the clock)."""
    body = h.call(client, "DescribeBackupPolicy", DBInstanceId=instance_id)
    body.pop("RequestId", None)
    body.pop("PreferredNextBackupTime", None)
    return body


RULES = [
    rule("regular", "Weekly", "Monday,Thursday", 30),
    rule("sundays", "Weekly", "Sunday", 60),
    rule("month-ends", "Monthly", "1,Last", 365),
    rule("new-year", "Yearly", "12-31", 3650),
]


def test_every_field_round_trips(instance, client):
    p = describe(client, instance.id)
    assert p.backup_interval == "-1"
    assert p.advanced_backup_policy_enabled is False
    assert rules(p)[0][0] == "regular"
    assert (p.archive_backup_retention_period, p.archive_backup_keep_policy) == ("0", "ByMonth")

    modify(
        client,
        instance.id,
        enable_advanced_backup_policy=1,
        advanced_data_policies=RULES,
        advanced_log_policies=[
            rds.ModifyBackupPolicyRequestAdvancedLogPolicies(
                log_retention_type="Days", log_retention_value=20, enable_log_backup=1
            )
        ],
        archive_backup_retention_period="90",
        archive_backup_keep_policy="ByWeek",
        archive_backup_keep_count=2,
    )
    h.call(client, "ModifyBackupPolicy", DBInstanceId=instance.id, StrataKeepLastBackups="5")
    p = describe(client, instance.id)
    assert p.advanced_backup_policy_enabled is True
    assert rules(p) == [
        ("regular", "Weekly", "Monday,Thursday", "Days", 30),
        ("sundays", "Weekly", "Sunday", "Days", 60),
        ("month-ends", "Monthly", "1,Last", "Days", 365),
        ("new-year", "Yearly", "12-31", "Days", 3650),
    ]
    # The regular rule is the policy's backup days and retention.
    assert (p.preferred_backup_period, p.backup_retention_period) == ("Monday,Thursday", 30)
    log = p.advanced_log_policies.advanced_log_policy
    assert [(l.log_retention_type, l.log_retention_value, l.enable_log_backup) for l in log] == [
        ("Days", 20, 1)
    ]
    assert (
        p.archive_backup_retention_period,
        p.archive_backup_keep_policy,
        p.archive_backup_keep_count,
    ) == ("90", "ByWeek", "2")
    assert h.call(client, "DescribeBackupPolicy", DBInstanceId=instance.id)["StrataKeepLastBackups"] == 5

    # What DescribeBackupPolicy answers goes back through ModifyBackupPolicy unchanged.
    before = state(client, instance.id)
    back = [
        rds.ModifyBackupPolicyRequestAdvancedDataPolicies().from_map(r.to_map())
        for r in p.advanced_data_policies.advanced_data_policy
    ]
    modify(client, instance.id, advanced_data_policies=back)
    assert state(client, instance.id) == before

    # Edits: every entry with an ActionType changes one rule.
    modify(
        client,
        instance.id,
        advanced_data_policies=[
            rule("sundays", None, None, None, action_type="DELETE"),
            rule("month-ends", "Monthly", "15", 400, action_type="UPDATE"),
            rule("leap-day", "Yearly", "02-29", 100, action_type="CREATE"),
        ],
    )
    assert rules(describe(client, instance.id))[1:] == [
        ("month-ends", "Monthly", "15", "Days", 400),
        ("new-year", "Yearly", "12-31", "Days", 3650),
        ("leap-day", "Yearly", "02-29", "Days", 100),
    ]
    # A JSON array in the plain parameter replaces the rules.
    h.call(
        client,
        "ModifyBackupPolicy",
        DBInstanceId=instance.id,
        AdvancedDataPolicies='[{"StrategyId":"weekends","FilterType":"Weekly","FilterValue":"Saturday,Sunday","RetentionType":"Days","RetentionValue":14}]',
    )
    assert rules(describe(client, instance.id))[1:] == [("weekends", "Weekly", "Saturday,Sunday", "Days", 14)]

    # Off again: count-based retention 0, archive 0, interval -1, advanced 0.
    h.call(
        client,
        "ModifyBackupPolicy",
        DBInstanceId=instance.id,
        StrataKeepLastBackups="0",
        ArchiveBackupRetentionPeriod="0",
        ArchiveBackupKeepPolicy="ByMonth",
        ArchiveBackupKeepCount="1",
        BackupInterval="-1",
        EnableAdvancedBackupPolicy="0",
    )
    body = h.call(client, "DescribeBackupPolicy", DBInstanceId=instance.id)
    assert (
        body["StrataKeepLastBackups"],
        body["ArchiveBackupRetentionPeriod"],
        body["BackupInterval"],
        body["AdvancedBackupPolicyEnabled"],
    ) == (0, "0", "-1", False)


def adv(*entries):
    return dict(advanced_data_policies=list(entries))


INVALID = [
    # The instance has no agent: no snapshots, so no high-frequency ones.
    pytest.param(dict(backup_interval="15"), "InvalidBackupInterval.NotSupported", id="interval-physical"),
    pytest.param(dict(category="Flash", backup_interval="15"), "InvalidBackupMethod.NotSupported", id="interval-flash-no-agent"),
    pytest.param(dict(backup_interval="20"), "InvalidBackupInterval.Malformed", id="interval-20"),
    pytest.param(dict(backup_interval="often"), "InvalidBackupInterval.Malformed", id="interval-word"),
    pytest.param(dict(enable_advanced_backup_policy=2), "InvalidEnableAdvancedBackupPolicy.Malformed", id="enable-2"),
    pytest.param(adv(rule("r", "Weekly", "Sunday", 3651)), "InvalidAdvancedDataPolicies.Malformed", id="rule-3651-days"),
    pytest.param(adv(rule("r", "Weekly", "Sunday", 0)), "InvalidAdvancedDataPolicies.Malformed", id="rule-0-days"),
    pytest.param(adv(rule("r", "Monthly", "32", 30)), "InvalidAdvancedDataPolicies.Malformed", id="day-32"),
    pytest.param(adv(rule("r", "Yearly", "02-30", 30)), "InvalidAdvancedDataPolicies.Malformed", id="february-30"),
    pytest.param(adv(rule("r", "Daily", "1", 30)), "InvalidAdvancedDataPolicies.Malformed", id="daily"),
    pytest.param(adv(rule("r", "Weekly", "Funday", 30)), "InvalidAdvancedDataPolicies.Malformed", id="funday"),
    pytest.param(adv(rule("bad id!", "Weekly", "Sunday", 30)), "InvalidAdvancedDataPolicies.Malformed", id="rule-id"),
    pytest.param(adv(rule("r", "Weekly", "Sunday", 30), rule("r", "Weekly", "Monday", 30)),
                 "InvalidAdvancedDataPolicies.Malformed", id="same-id-twice"),
    pytest.param(adv(rule("regular", None, None, None, action_type="DELETE")),
                 "InvalidAdvancedDataPolicies.Malformed", id="delete-regular"),
    pytest.param(adv(rule("nobody", None, None, None, action_type="DELETE")),
                 "InvalidAdvancedDataPolicies.Malformed", id="delete-unknown"),
    pytest.param(adv(rule("r", "Weekly", "Sunday", 30, action_type="CREATE"), rule("s", "Weekly", "Monday", 30)),
                 "InvalidAdvancedDataPolicies.Malformed", id="mixed-actions"),
    pytest.param(adv(rule("r", "Weekly", "Sunday", 30, dest_region="cn-hangzhou")),
                 "InvalidAdvancedDataPolicies.Malformed", id="dest-region"),
    pytest.param(adv(rule("regular", "Weekly", "Monday", 30)), "InvalidPreferredBackupPeriod.Malformed", id="regular-one-day"),
    pytest.param(adv(rule("regular", "Weekly", "Monday,Friday", 731)), "InvalidBackupRetentionPeriod.Malformed", id="regular-731"),
    pytest.param(dict(advanced_log_policies=[rds.ModifyBackupPolicyRequestAdvancedLogPolicies(log_retention_value=7301)]),
                 "InvalidLogBackupRetentionPeriod.Malformed", id="log-7301"),
    pytest.param(dict(advanced_log_policies=[rds.ModifyBackupPolicyRequestAdvancedLogPolicies(log_retention_type="Months", log_retention_value=2)]),
                 "InvalidAdvancedLogPolicies.Malformed", id="log-months"),
    pytest.param(dict(archive_backup_retention_period="29"), "InvalidArchiveBackupPolicy.Malformed", id="archive-29"),
    pytest.param(dict(archive_backup_retention_period="1096"), "InvalidArchiveBackupPolicy.Malformed", id="archive-1096"),
    pytest.param(dict(archive_backup_keep_policy="ByYear"), "InvalidArchiveBackupPolicy.Malformed", id="by-year"),
    pytest.param(dict(archive_backup_keep_policy="ByWeek", archive_backup_keep_count=8),
                 "InvalidArchiveBackupPolicy.Malformed", id="by-week-8"),
    pytest.param(dict(archive_backup_keep_policy="ByMonth", archive_backup_keep_count=32),
                 "InvalidArchiveBackupPolicy.Malformed", id="by-month-32"),
]


@pytest.mark.parametrize("change,code", INVALID)
def test_bad_values_are_refused_and_change_nothing(instance, client, change, code):
    before = state(client, instance.id)
    # A valid change mixed in must not be applied either.
    e = h.expect_error(code, 400, modify, client, instance.id, preferred_backup_time="05:00Z-06:00Z", **change)
    assert e.data["Code"] == code
    assert state(client, instance.id) == before


@pytest.mark.parametrize(
    "query,code",
    [
        (dict(StrataKeepLastBackups="1001"), "InvalidKeepLast.Malformed"),
        (dict(StrataKeepLastBackups="many"), "InvalidKeepLast.Malformed"),
        (dict(AdvancedDataPolicies="{not json"), "InvalidAdvancedDataPolicies.Malformed"),
        (dict(**{"AdvancedDataPolicies.x.StrategyId": "r"}), "InvalidAdvancedDataPolicies.Malformed"),
    ],
)
def test_bad_extension_values_are_refused(instance, client, query, code):
    before = state(client, instance.id)
    h.expect_error(code, 400, h.call, client, "ModifyBackupPolicy", DBInstanceId=instance.id, **query)
    assert state(client, instance.id) == before


def backups(client, instance_id):
    return h.call(client, "DescribeBackups", DBInstanceId=instance_id)["Items"]["Backup"]


def test_keep_release_and_dry_run(instance, client):
    backup_id = instance.first_job["BackupId"]
    kept = h.call(
        client, "StrataKeepBackup", DBInstanceId=instance.id, BackupId=backup_id,
        KeepUntil="forever", Note="audit 2026",
    )
    assert (kept["BackupId"], kept["StrataKeepUntil"], kept["StrataKeepNote"]) == (backup_id, "forever", "audit 2026")
    (listed,) = [b for b in backups(client, instance.id) if b["BackupId"] == backup_id]
    assert (listed["StrataKeepUntil"], listed["StrataKeepNote"]) == ("forever", "audit 2026")
    assert listed["StrataKeptBy"]
    dry = h.call(client, "StrataDescribeRetention", DBInstanceId=instance.id)
    (fate,) = [d for d in dry["Items"]["Backup"] if d["BackupId"] == backup_id]
    assert fate["StrataAction"] == "Keep" and fate["StrataKeptBy"], fate

    # Until a time to come, then released.
    until = h.call(
        client, "StrataKeepBackup", DBInstanceId=instance.id, BackupId=backup_id,
        KeepUntil="2099-01-01T00:00:00Z",
    )
    assert until["StrataKeepUntil"] == "2099-01-01T00:00:00Z"
    released = h.call(client, "StrataReleaseBackup", DBInstanceId=instance.id, BackupId=backup_id)
    assert released["StrataKeepUntil"] == ""
    (listed,) = [b for b in backups(client, instance.id) if b["BackupId"] == backup_id]
    assert "StrataKeepUntil" not in listed and "StrataKeepNote" not in listed

    for bad in ("2020-01-01T00:00:00Z", "tomorrow"):
        h.expect_error(
            "InvalidKeepUntil.Malformed", 400, h.call, client, "StrataKeepBackup",
            DBInstanceId=instance.id, BackupId=backup_id, KeepUntil=bad,
        )
    h.expect_error(
        "MissingParameter", 400, h.call, client, "StrataKeepBackup", DBInstanceId=instance.id
    )
    (listed,) = [b for b in backups(client, instance.id) if b["BackupId"] == backup_id]
    assert "StrataKeepUntil" not in listed
