"""What a backup set holds, through the official SDK with both signatures:
DescribeBackupDatabase and DescribeMetaList list the databases and tables
recorded with a set (a table dropped on the live server afterwards stays
listed with the set), page them as RDS does, list them at a point in time
(without the tables dropped before it), and DescribeCrossBackupMetaList
lists the same from a cross-region copy. Hostile names come back as the
data they are.

Run by crates/strata/tests/api.rs with a server whose own region is
cn-hangzhou and whose copy target cn-beijing is a directory."""

import math
import time
import uuid

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h
from test_restore import psql_db, wait_recoverable_past

PRIMARY = "cn-hangzhou"
TARGET = "cn-beijing"
PAGED = 25
ODD_SCHEMA = 'odd "schema"'
ODD_TABLE = 'it\'s "quoted"'
UNICODE_TABLE = "表_ünïcødé"
LONG_TABLE = "L" * 63
DOTTED_TABLE = "a.b,c"


def q(name):
    return '"' + name.replace('"', '""') + '"'


def meta(client, instance_id, **kw):
    body = h.call(client, "DescribeMetaList", DBInstanceId=instance_id, **kw)
    items = body["Items"]["Meta"]
    assert body["PageRecordCount"] == len(items), body
    assert body["DBInstanceName"] == instance_id
    return body


def tables_of(body):
    return {(m["StrataSchema"], m["StrataTable"]) for m in body["Items"]["Meta"]}


def ceil_second(t):
    return t.replace(microsecond=0) + (h.dt.timedelta(seconds=1) if t.microsecond else h.dt.timedelta())


def wait_until(t):
    while h.utcnow() <= t:
        time.sleep(0.2)


class Set:
    """The test database, the set taken of it, and times around a drop."""


@pytest.fixture(scope="module")
def taken(instance, admin):
    s = Set()
    tag = uuid.uuid4().hex[:8]
    s.db = f"meta_{tag}"
    s.odd_db = f"Meta,{tag} 'q\""
    s.tag = tag
    h.psql(f"CREATE DATABASE {q(s.db)}")
    h.psql(f"CREATE DATABASE {q(s.odd_db)}")
    paged = "".join(f"CREATE TABLE t_{i:02d} (id int);" for i in range(PAGED))
    psql_db(s.db, f"""
        CREATE TABLE keep_me (id int PRIMARY KEY, note text);
        INSERT INTO keep_me SELECT g, md5(g::text) FROM generate_series(1, 500) g;
        CREATE TABLE drop_me (id int PRIMARY KEY);
        INSERT INTO drop_me SELECT generate_series(1, 100);
        CREATE SCHEMA {q(ODD_SCHEMA)};
        CREATE TABLE {q(ODD_SCHEMA)}.{q(ODD_TABLE)} (id int);
        CREATE TABLE {q(UNICODE_TABLE)} (id int);
        CREATE TABLE {q(LONG_TABLE)} (id int);
        CREATE TABLE {q(DOTTED_TABLE)} (id int);
        CREATE MATERIALIZED VIEW mv AS SELECT 1 AS one;
        CREATE VIEW not_a_table AS SELECT 1 AS one;
        CREATE TEMP TABLE not_kept (id int);
        {paged}""")
    s.expected = {
        ("public", "keep_me"), ("public", "drop_me"), (ODD_SCHEMA, ODD_TABLE),
        ("public", UNICODE_TABLE), ("public", LONG_TABLE), ("public", DOTTED_TABLE),
        ("public", "mv"),
    } | {("public", f"t_{i:02d}") for i in range(PAGED)}
    # The WAL receiver reads the new tables' names after their commits.
    time.sleep(2)
    job = h.backup(admin, instance.id)
    s.backup_id = job.backup_id
    (item,) = h.call(admin, "DescribeBackups", DBInstanceId=instance.id, BackupId=s.backup_id)["Items"]["Backup"]
    # A point after the set, before the drop.
    s.before_drop = h.parse_time(item["BackupEndTime"]) + h.dt.timedelta(seconds=2)
    wait_until(s.before_drop + h.dt.timedelta(seconds=1))
    # After the set: one table dropped, one created, one renamed.
    psql_db(s.db, "DROP TABLE drop_me")
    psql_db(s.db, "CREATE TABLE born_later (id int)")
    psql_db(s.db, "ALTER TABLE t_00 RENAME TO t_00_renamed")
    s.now = (s.expected - {("public", "drop_me"), ("public", "t_00")}) | {
        ("public", "born_later"), ("public", "t_00_renamed")}
    s.after_drop = ceil_second(h.utcnow()) + h.dt.timedelta(seconds=1)
    wait_until(s.after_drop + h.dt.timedelta(seconds=1))
    psql_db(s.db, "INSERT INTO keep_me VALUES (1000, 'after'); SELECT pg_switch_wal();")
    wait_recoverable_past(admin, instance.id, s.after_drop)
    yield s
    for db in (s.db, s.odd_db):
        h.psql(f"DROP DATABASE IF EXISTS {q(db)}")


def test_backup_database_lists_the_sets_databases(client, instance, taken):
    body = client.describe_backup_database(rds.DescribeBackupDatabaseRequest(
        dbinstance_id=instance.id, backup_id=taken.backup_id)).body
    raw = h.call(client, "DescribeBackupDatabase", DBInstanceId=instance.id, BackupId=taken.backup_id)
    names = raw["StrataDatabaseNames"]
    assert body.database_names == raw["DatabaseNames"] == ",".join(names)
    assert names == sorted(names)
    assert {"postgres", taken.db, taken.odd_db} <= set(names)
    assert not {"template0", "template1"} & set(names)
    assert raw["StrataBackupId"] == taken.backup_id


def test_a_table_dropped_after_the_backup_is_listed_with_the_set(client, instance, taken):
    assert psql_db(taken.db, "SELECT count(*) FROM pg_class WHERE relname = 'drop_me'") == "0"
    typed = client.describe_meta_list(rds.DescribeMetaListRequest(
        dbinstance_id=instance.id, restore_type="BackupSetID",
        backup_set_id=int(taken.backup_id), get_db_name=taken.db)).body
    assert typed.total_record_count == len(taken.expected) == len(typed.items.meta)
    assert (typed.page_number, typed.total_page_count) == (1, 1)
    assert {m.database for m in typed.items.meta} == {taken.db}
    tables = {m.tables for m in typed.items.meta}
    assert "public.drop_me" in tables and f"{ODD_SCHEMA}.{ODD_TABLE}" in tables
    # The default RestoreType is BackupSetID; names come back exactly.
    raw = meta(client, instance.id, BackupSetID=taken.backup_id, GetDbName=taken.db)
    assert tables_of(raw) == taken.expected
    assert raw["StrataBackupId"] == taken.backup_id
    by_name = {m["StrataTable"]: m for m in raw["Items"]["Meta"]}
    assert int(by_name["keep_me"]["Size"]) > 8192
    assert by_name["mv"]["StrataTableKind"] == "MaterializedView"
    assert by_name["keep_me"]["StrataTableKind"] == "Table"
    assert len(by_name[LONG_TABLE]["StrataTable"].encode()) == 63
    # Sorted by schema, then name.
    order = [(m["StrataSchema"], m["StrataTable"]) for m in raw["Items"]["Meta"]]
    assert order == sorted(order)


def test_pages_and_their_totals(client, instance, taken):
    total = len(taken.expected)
    seen = []
    pages = math.ceil(total / 10)
    for index in range(1, pages + 1):
        body = meta(client, instance.id, BackupSetID=taken.backup_id, GetDbName=taken.db,
                    PageIndex=index, PageSize=10)
        assert (body["PageNumber"], body["TotalRecordCount"], body["TotalPageCount"]) == (index, total, pages)
        assert body["PageRecordCount"] == (10 if index < pages else total - 10 * (pages - 1))
        seen += [(m["StrataSchema"], m["StrataTable"]) for m in body["Items"]["Meta"]]
    assert len(seen) == len(set(seen)) == total and set(seen) == taken.expected
    past = meta(client, instance.id, BackupSetID=taken.backup_id, GetDbName=taken.db,
                PageIndex=pages + 1, PageSize=10)
    assert past["Items"]["Meta"] == [] and past["TotalRecordCount"] == total
    # One of the two alone does not page, as RDS says.
    alone = meta(client, instance.id, BackupSetID=taken.backup_id, GetDbName=taken.db, PageSize=3)
    assert alone["PageRecordCount"] == total


def test_pattern_matches_database_names_only(client, instance, taken):
    body = meta(client, instance.id, BackupSetID=taken.backup_id, Pattern=taken.tag.upper())
    assert sorted(m["Database"] for m in body["Items"]["Meta"]) == sorted([taken.db, taken.odd_db])
    assert all(m["Tables"] == "" for m in body["Items"]["Meta"])
    counts = {m["Database"]: m.get("StrataTableCount") for m in body["Items"]["Meta"]}
    assert counts[taken.db] == len(taken.expected) and counts[taken.odd_db] == 0
    every = meta(client, instance.id, BackupSetID=taken.backup_id)
    assert {taken.db, taken.odd_db, "postgres"} <= {m["Database"] for m in every["Items"]["Meta"]}
    assert all(int(m["Size"]) > 0 for m in every["Items"]["Meta"])


def test_point_in_time_lists_without_what_was_dropped_before_it(client, instance, taken):
    before = meta(client, instance.id, RestoreType="RestoreTime", GetDbName=taken.db,
                  RestoreTime=h.fmt_seconds(taken.before_drop))
    assert tables_of(before) == taken.expected
    assert before["StrataBackupId"] == taken.backup_id
    assert before["StrataRestoreTime"] == h.fmt_seconds(taken.before_drop)
    typed = client.describe_meta_list(rds.DescribeMetaListRequest(
        dbinstance_id=instance.id, restore_type="RestoreTime", get_db_name=taken.db,
        restore_time=h.fmt_seconds(taken.after_drop))).body
    assert "public.drop_me" not in {m.tables for m in typed.items.meta}
    # Names the WAL receiver read after the set bring the list forward; it
    # reads them within a second or so of a catalog change, so a later
    # time is tried when the first came too soon.
    later = listed_later(client, instance.id, taken)
    assert tables_of(later) == taken.now, tables_of(later) ^ taken.now
    by_name = {m["StrataTable"]: m for m in later["Items"]["Meta"]}
    assert by_name["t_00_renamed"]["StrataTableOid"] == before_oids(before)["t_00"]
    assert by_name["born_later"]["Size"] == "0"


def before_oids(body):
    return {m["StrataTable"]: m["StrataTableOid"] for m in body["Items"]["Meta"]}


def listed_later(client, instance_id, taken, timeout=30):
    deadline = time.monotonic() + timeout
    t = taken.after_drop
    while True:
        body = meta(client, instance_id, RestoreType="RestoreTime", GetDbName=taken.db,
                    RestoreTime=h.fmt_seconds(t))
        if tables_of(body) == taken.now or time.monotonic() > deadline:
            return body
        t = ceil_second(h.utcnow()) + h.dt.timedelta(seconds=1)
        wait_until(t + h.dt.timedelta(seconds=1))
        psql_db(taken.db, "INSERT INTO t_01 VALUES (1); SELECT pg_switch_wal();")
        wait_recoverable_past(client, instance_id, t)


def test_refusals(client, instance, taken):
    c = client
    h.expect_error("InvalidBackupSetID.NotFound", 404, meta, c, instance.id, BackupSetID="1")
    h.expect_error("MissingParameter", 400, meta, c, instance.id)
    h.expect_error("MissingParameter", 400, h.call, c, "DescribeBackupDatabase", DBInstanceId=instance.id)
    h.expect_error("InvalidBackupSetID.NotFound", 404, h.call, c, "DescribeBackupDatabase",
                   DBInstanceId=instance.id, BackupId="no-such-set")
    h.expect_error("InvalidDBInstance.NotFound", 404, meta, c, "sdk-no-such-instance",
                   BackupSetID=taken.backup_id)
    ok = dict(BackupSetID=taken.backup_id)
    h.expect_error("InvalidRestoreType.Malformed", 400, meta, c, instance.id, RestoreType="Bogus", **ok)
    h.expect_error("InvalidPageIndex.Malformed", 400, meta, c, instance.id, PageIndex=0, PageSize=5, **ok)
    h.expect_error("InvalidPageIndex.Malformed", 400, meta, c, instance.id, PageIndex="x", PageSize=5, **ok)
    for bad in (0, 1001):
        h.expect_error("InvalidPageSize.Malformed", 400, meta, c, instance.id, PageIndex=1, PageSize=bad, **ok)
    h.expect_error("InvalidDBName.NotFound", 400, meta, c, instance.id, GetDbName=f"{taken.db}_x", **ok)
    h.expect_error("InvalidParameterCombination", 400, meta, c, instance.id,
                   GetDbName=taken.db, Pattern="meta", **ok)
    h.expect_error("MissingParameter", 400, meta, c, instance.id, RestoreType="RestoreTime")
    h.expect_error("InvalidRestoreTime.Format", 400, meta, c, instance.id, RestoreType="RestoreTime",
                   RestoreTime="yesterday")
    future = h.utcnow() + h.dt.timedelta(days=1)
    h.expect_error("InvalidRestoreTime", 400, meta, c, instance.id, RestoreType="RestoreTime",
                   RestoreTime=h.fmt_seconds(future))


def test_read_only_keys_list_contents(ro_client, instance, taken):
    body = meta(ro_client, instance.id, BackupSetID=taken.backup_id, GetDbName=taken.db)
    assert tables_of(body) == taken.expected


def cross(client, **kw):
    return h.call(client, "DescribeCrossBackupMetaList", **kw)


def test_a_cross_region_copy_lists_what_its_set_does(instance, admin, taken):
    admin.modify_instance_cross_backup_policy(rds.ModifyInstanceCrossBackupPolicyRequest(
        dbinstance_id=instance.id, region_id=PRIMARY, cross_backup_region=TARGET,
        cross_backup_type="1", backup_enabled="Enable", log_backup_enabled="Disable",
        retent_type=1, retention=7))
    backup_id = h.backup(admin, instance.id).backup_id
    deadline = time.monotonic() + 240
    while True:
        copies = h.call(admin, "DescribeCrossRegionBackups", DBInstanceId=instance.id,
                        RegionId=PRIMARY)["Items"]["Item"]
        found = [c for c in copies if c["StrataBackupId"] == backup_id]
        if found:
            break
        assert time.monotonic() < deadline, f"no copy of {backup_id}: {copies}"
        time.sleep(0.5)
    copy_id = found[0]["CrossBackupId"]
    own = meta(admin, instance.id, BackupSetID=backup_id, GetDbName=taken.db)
    expected_now = taken.now
    assert tables_of(own) == expected_now
    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        typed = client.describe_cross_backup_meta_list(rds.DescribeCrossBackupMetaListRequest(
            backup_set_id=str(copy_id), get_db_name=taken.db, region=TARGET,
            page_index="1", page_size="5")).body
        assert typed.dbinstance_name == instance.id
        assert (typed.total_record_count, typed.total_page_count) == (len(expected_now), math.ceil(len(expected_now) / 5))
        assert len(typed.items.meta) == 5
        body = cross(client, BackupSetId=copy_id, GetDbName=taken.db)
        assert body["Items"]["Meta"] == own["Items"]["Meta"]
        assert body["StrataBackupId"] == backup_id and body["StrataCrossBackupId"] == copy_id
        dbs = cross(client, BackupSetId=copy_id, Pattern=taken.tag)
        assert sorted(m["Database"] for m in dbs["Items"]["Meta"]) == sorted([taken.db, taken.odd_db])
    h.expect_error("InvalidBackupSetID.NotFound", 404, cross, admin, BackupSetId=copy_id, Region="mars-north-1")
    h.expect_error("InvalidBackupSetID.NotFound", 404, cross, admin, BackupSetId=copy_id + 1000)
    h.expect_error("InvalidBackupSetID.Malformed", 400, cross, admin, BackupSetId="one")
    h.expect_error("MissingParameter", 400, cross, admin, GetDbName=taken.db)
    h.expect_error("InvalidDBName.NotFound", 400, cross, admin, BackupSetId=copy_id, GetDbName="nope")
