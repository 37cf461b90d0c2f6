"""Recovery events through the official SDK with both signatures: a large
DELETE decoded from the WAL as it arrives is listed by
StrataDescribeRecoveryEvents with its table, xid and restore targets, and
undone exactly with RestoreTable to just before it."""

import time
import uuid

import pytest

import helpers as h

WAIT = 60


def events(client, instance_id, **kw):
    body = h.call(client, "StrataDescribeRecoveryEvents", DBInstanceId=instance_id, PageSize=100, **kw)
    items = body["Items"]["RecoveryEvent"]
    assert body["TotalRecordCount"] >= len(items) == body["PageRecordCount"], body
    return items


def wait_event(client, instance_id, table, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        found = events(client, instance_id, TableName=table)
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"no event for {table} after {timeout}s: {events(client, instance_id)}")
        time.sleep(0.3)


def digest(table):
    return h.psql(
        f"SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t"
    )


@pytest.fixture(scope="module")
def deleted(instance, admin):
    """A table of 1500 rows emptied by one DELETE (and written to again
    after it); answers its name, the xid and the digest just before."""
    table = f"ev_{uuid.uuid4().hex[:8]}"
    h.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    h.psql(f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 1500) g")
    # The receiver reads the new table's name after the CREATE's commit.
    time.sleep(2)
    before = digest(table)
    out = h.psql(f"WITH d AS (DELETE FROM {table} RETURNING 1) SELECT txid_current(), count(*) FROM d")
    xid, rows = out.split("|")
    assert rows == "1500", out
    h.psql(f"INSERT INTO {table} VALUES (1, 'written after the delete')")
    return table, xid, before


def test_a_large_delete_is_listed_with_its_restore_targets(client, instance, deleted):
    table, xid, _ = deleted
    (event,) = wait_event(client, instance.id, table)
    assert event["EventType"] == "Delete"
    assert event["Xid"] == xid
    assert event["Rows"] == 1500
    assert (event["DBName"], event["SchemaName"]) == ("postgres", "public")
    assert event["EventTime"].endswith("Z") and event["StrataEventTime"].startswith(event["EventTime"][:19])
    targets = event["RestoreTargets"]
    assert targets["JustBefore"] == {"StrataRestoreTargetXid": xid, "StrataRestoreTargetInclusive": "false"}
    assert targets["JustAfter"] == {"StrataRestoreTargetXid": xid, "StrataRestoreTargetInclusive": "true"}
    assert targets["JustBeforeLsn"] == {"StrataRestoreTargetLsn": event["Lsn"], "StrataRestoreTargetInclusive": "false"}
    # Filters narrow, they do not widen.
    assert events(client, instance.id, TableName=table, EventType="DropTable") == []
    assert [e["Xid"] for e in events(client, instance.id, TableName=f"public.{table}")] == [xid]
    assert events(client, instance.id, TableName=table, DBName="no_such_db") == []


def test_read_only_keys_list_events(ro_client, instance, deleted):
    table, xid, _ = deleted
    assert [e["Xid"] for e in wait_event(ro_client, instance.id, table)] == [xid]


def test_bad_filters_are_refused(client, instance):
    with pytest.raises(Exception) as info:
        h.call(client, "StrataDescribeRecoveryEvents", DBInstanceId=instance.id, EventType="Delete,Explode")
    assert "InvalidEventType.Malformed" in str(info.value)
    # Hostile values and a list past 100 entries are refused the same way.
    for bad in ["Delete=1", "Delete,'; DROP TABLE x", "Delete\nTruncate", "..", "x" * 64,
                ",".join(["Delete"] * 101)]:
        with pytest.raises(Exception) as info:
            h.call(client, "StrataDescribeRecoveryEvents", DBInstanceId=instance.id, EventType=bad)
        assert "InvalidEventType.Malformed" in str(info.value), bad
    with pytest.raises(Exception) as info:
        h.call(client, "StrataDescribeRecoveryEvents", DBInstanceId="sdk-no-such-instance")
    assert "InvalidDBInstance.NotFound" in str(info.value)


def test_restore_table_to_just_before_the_event_undoes_it(admin, instance, deleted):
    """The event's JustBefore parameters, passed as they are, bring the
    table back as it was committed right before the DELETE, beside the
    original, which keeps its current row."""
    table, xid, before = deleted
    (event,) = wait_event(admin, instance.id, table)
    meta = (f'[{{"type":"db","name":"postgres","tables":'
            f'[{{"type":"table","name":"public.{table}","newname":"{table}_back"}}]}}]')
    body = h.call(admin, "RestoreTable", DBInstanceId=instance.id, TableMeta=meta,
                  **event["RestoreTargets"]["JustBefore"])
    done = h.wait_job(admin, instance.id, body["StrataJobId"], timeout=180)
    assert done.backup_status == "Finished", h.jobs(admin, instance.id)
    assert digest(f"{table}_back") == before
    assert h.psql(f"SELECT count(*), max(v) FROM {table}") == "1|written after the delete"


def test_hostile_names_are_data(client, instance):
    """A table whose name holds a quote, a newline, `=`, `..` and 63 bytes
    is listed under exactly that name; filter values like it match nothing
    else and break nothing."""
    tag = uuid.uuid4().hex[:8]
    name = f"we'ird\n= ..{tag}" + "n" * 44
    assert len(name.encode()) == 63
    quoted = '"' + name.replace('"', '""') + '"'
    h.psql(f"CREATE TABLE {quoted} (id int)")
    h.psql(f"INSERT INTO {quoted} SELECT g FROM generate_series(1, 1200) g")
    time.sleep(2)
    h.psql(f"DELETE FROM {quoted}")
    (event,) = wait_event(client, instance.id, name)
    assert (event["TableName"], event["Rows"]) == (name, 1200)
    for hostile in ["x' OR '1'='1", "..", "a\nb", "=", "public." + name + "x"]:
        assert events(client, instance.id, TableName=hostile) == []
        assert events(client, instance.id, DBName=hostile) == []
