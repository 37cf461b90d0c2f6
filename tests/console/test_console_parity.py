"""What the console offers beside the API's newer actions, in headless
Chromium: backup sets and WAL segments download from their lists, the
cross-region backup policy is changed on its tab and the copies it makes are
listed, single tables are restored under new names, and a clone is made to a
point in time. The tests run in file order.
"""

import io
import re
import tarfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone

from selenium.webdriver.support.ui import Select

from conftest import psql, wait_clone_running, wait_task_finished

REGION = "eu-copy"


def ledger_sum(env, port=None, table="ledger"):
    """Row count and a digest of every row, to compare copies."""
    return psql(env, f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t",
                port=port)


def fetch(console, href):
    """The bytes behind a link of the page (relative or absolute), as any client gets them."""
    url = href if href.startswith("http") else console.base + href
    with urllib.request.urlopen(url, timeout=120) as r:
        assert r.status == 200, (r.status, url)
        return r.read()


def set_field(console, css, value):
    field = console.find(css)
    field.clear()
    field.send_keys(value)


def test_sign_in(console, env):
    console.sign_in(*env["admin"])
    assert console.path() == "/console/"


def test_backup_set_downloads_as_a_tar(console, env):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/backups")
    row = console.find("#data-backups tbody tr")
    link = row.find_element("css selector", "td.download a.dl")
    assert link.text == "Download"
    href = link.get_attribute("href")
    assert "/download/backups/" in href and "Signature=" in href, href
    data = fetch(console, href)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert {"base.tar", "backup_manifest"} <= set(names), names
        base = tar.extractfile("base.tar").read()
    # The data directory inside holds the cluster's files.
    with tarfile.open(fileobj=io.BytesIO(base)) as inner:
        files = set(inner.getnames())
    assert "PG_VERSION" in files and "global/pg_control" in files, sorted(files)[:20]

    # A WAL segment of the log list downloads as its 16 MiB.
    console.go(f"/console/instances/{instance}/backups?view=log")
    link = console.find("#log-backups tbody td.download a")
    segment = link.find_element("xpath", "../..").find_element("css selector", "td code").text
    assert link.get_attribute("href").split("?")[0].endswith(f"/download/wal/{instance}/{segment}")
    wal = fetch(console, link.get_attribute("href"))
    # A whole segment, starting with PostgreSQL 15's page header magic.
    assert len(wal) == 16 * 1024 * 1024 and wal[:2] == b"\x10\xd1", (len(wal), wal[:2])
    console.shot("backup-downloads")


def test_cross_region_policy_is_refused_inline_then_saved(console, env, api):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/cross-region")
    assert console.find("nav.tabs a[aria-current=page]").text == "Cross-Region Backup"
    assert [o.get_attribute("value") for o in console.finds("#cross-region option")] == ["", REGION]
    assert not console.finds("#cross-copies tr[data-copy]")
    # On without a region: the API's refusal, under the field.
    console.find("#cross-backup").click()
    console.click_through(console.find("#cross-submit"))
    error = console.text("#cross-region-error")
    assert "CrossBackupRegion is required" in error and "MissingParameter" in error, error
    assert console.find("#cross-backup").is_selected()
    # A retention out of range.
    Select(console.find("#cross-region")).select_by_value(REGION)
    set_field(console, "#cross-retention", "3")
    console.click_through(console.find("#cross-submit"))
    error = console.text("#cross-retention-error")
    assert "Retention must be 7 to 1825 days" in error and "InvalidRetention.Malformed" in error, error
    assert console.find("#cross-retention").get_attribute("value") == "3"
    policy = api._curl("DescribeInstanceCrossBackupPolicy", f"DBInstanceId={instance}")
    assert policy["BackupEnabled"] == "Disable", policy

    set_field(console, "#cross-retention", "30")
    console.find("#cross-log").click()
    console.click_through(console.find("#cross-submit"))
    assert "saved" in console.text(".notice.ok")
    policy = api._curl("DescribeInstanceCrossBackupPolicy", f"DBInstanceId={instance}")
    assert (policy["CrossBackupRegion"], policy["BackupEnabled"], policy["LogBackupEnabled"], policy["Retention"]) \
        == (REGION, "Enable", "Enable", 30), policy
    # The form shows what is stored.
    assert console.find("#cross-backup").is_selected() and console.find("#cross-log").is_selected()
    assert console.find("#cross-retention").get_attribute("value") == "30"


def test_copies_of_new_backups_are_listed(console, env, api):
    instance = env["instance"]
    job = api.create_backup(instance)["BackupJobId"]
    console.go(f"/console/tasks?instance={instance}")
    wait_task_finished(console, "Manually Back Up Instance", job=str(job))
    sets = api._curl("DescribeBackups", f"DBInstanceId={instance}")["Items"]["Backup"]
    backup_id = sets[0]["BackupId"]

    def listed():
        time.sleep(1)
        console.go(f"/console/instances/{instance}/cross-region")
        rows = [r for r in console.finds("#cross-copies tr[data-copy]")
                if r.find_element("css selector", "td:nth-child(2)").text == backup_id]
        return rows and rows[0]

    row = console.wait("the copy of the new set", listed, timeout=180)
    cells = [c.text for c in row.find_elements("css selector", "td")]
    assert cells[2] == REGION, cells
    copies = api._curl("DescribeCrossRegionBackups", f"DBInstanceId={instance}")["Items"]["Item"]
    assert [str(c["CrossBackupId"]) for c in copies if c["StrataBackupId"] == backup_id] \
        == [row.get_attribute("data-copy")], copies
    console.shot("cross-region")


def test_restore_a_table_under_a_new_name(console, env):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/restore")
    form = console.find("#tbl-form")
    set_field(console, "#tbl-db", "postgres")
    form.find_elements("css selector", "input[name=table_name]")[0].send_keys("ledger")
    form.find_elements("css selector", "input[name=table_newname]")[0].send_keys("ledger")
    console.click_through(console.find("#tbl-submit"))
    error = console.text("#tbl-databases-error")
    assert "already exists" in error and "InvalidTableName.Duplicate" in error, error
    assert console.find("#tbl-db").get_attribute("value") == "postgres"

    set_field(console, "#tbl-form input[name=table_newname]", "ledger_back")
    console.click_through(console.find("#tbl-submit"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    assert "postgres.ledger as ledger_back" in notice, notice
    job = re.search(r"Restore task (\d+) started", notice).group(1)
    wait_task_finished(console, "Restore Databases or Tables", job=job)
    assert ledger_sum(env, table="ledger_back") == ledger_sum(env)
    assert ledger_sum(env, table="ledger_back").startswith("300|")


def test_clone_to_a_point_in_time(console, env, api):
    instance = env["instance"]
    psql(env, "CREATE TABLE pitr (id int PRIMARY KEY); INSERT INTO pitr SELECT generate_series(1, 50)")
    committed = datetime.now(timezone.utc)
    target = (committed + timedelta(seconds=2)).replace(microsecond=0)
    time.sleep((target - datetime.now(timezone.utc)).total_seconds() + 2)
    psql(env, "INSERT INTO pitr SELECT generate_series(51, 80)")
    psql(env, "SELECT pg_switch_wal()")

    def covered():
        time.sleep(1)
        console.go(f"/console/instances/{instance}/restore")
        end = console.find("#clone-time").get_attribute("data-max-utc")
        return end and datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) > target

    console.wait("the recoverable window to pass the target", covered, timeout=120)
    console.find("#clone-form input[value=BackupTime]").click()
    picker = console.find("#clone-time")
    local = (target + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S")
    console.d.execute_script("arguments[0].value = arguments[1]", picker, local)
    console.click_through(console.find("#clone-submit"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    clone = re.search(r"New instance (\S+) is being created", notice).group(1)
    try:
        row = wait_task_finished(console, "Clone to New Instance")
        assert row.find_element("css selector", "td[data-f=instance]").text == instance
        row = wait_clone_running(console, clone)
        cells = [c.text for c in row.find_elements("css selector", "td")]
        port = int(re.match(r"127\.0\.0\.1:(\d+)$", cells[1]).group(1))
        # The rows committed before the target, none of those after.
        assert psql(env, "SELECT count(*), max(id) FROM pitr", port=port) == "50|50"
        assert ledger_sum(env, port=port) == ledger_sum(env)
    finally:
        api.delete_instance(clone)


def test_read_only_key_changes_nothing(console, env, api):
    instance = env["instance"]
    policy = lambda: {k: v for k, v in api._curl(
        "DescribeInstanceCrossBackupPolicy", f"DBInstanceId={instance}").items() if k != "RequestId"}
    before = policy()
    assert before["BackupEnabled"] == "Enable", before
    console.sign_out()
    console.sign_in(*env["reader"])
    console.go(f"/console/instances/{instance}/cross-region")
    assert not console.finds("#cross-submit")
    assert console.find("#cross-form fieldset").get_attribute("disabled") is not None
    assert console.finds("#cross-copies tr[data-copy]")
    console.go(f"/console/instances/{instance}/restore")
    assert not console.finds("#tbl-submit")
    # Download links are for reading: offered to a read-only key too.
    console.go(f"/console/instances/{instance}/backups")
    assert console.finds("#data-backups td.download a.dl")

    # The server refuses a POST with the session's token, and one without it.
    post = """
        const [url, fields, done] = arguments;
        fetch(url, {method: 'POST', body: new URLSearchParams(fields)})
          .then(r => r.text().then(t => done([r.status, t])));
    """
    token = console.find("input[name=csrf]").get_attribute("value")
    change = {"csrf": token, "backup": "", "region": "eu-copy", "retention": "7"}
    status, body = console.d.execute_async_script(post, f"/console/instances/{instance}/cross-region", change)
    assert status == 403 and "Forbidden.ReadOnlyAccessKey" in body, (status, body)
    tables = {"csrf": token, "tbl_db": "postgres", "table_name": "ledger", "table_newname": "ledger_ro"}
    status, body = console.d.execute_async_script(post, f"/console/instances/{instance}/restore/tables", tables)
    assert status == 403 and "Forbidden.ReadOnlyAccessKey" in body, (status, body)
    status, body = console.d.execute_async_script(
        post, f"/console/instances/{instance}/cross-region", {**change, "csrf": "forged"})
    assert status == 403 and "Request refused" in body, (status, body)
    assert policy() == before


def test_new_pages_fit_a_narrow_screen(console, env):
    instance = env["instance"]
    console.viewport(390, 844, mobile=True)
    try:
        for name, path in [
            ("narrow-cross-region", f"/console/instances/{instance}/cross-region"),
            ("narrow-restore-tables", f"/console/instances/{instance}/restore"),
            ("narrow-base-backups-downloads", f"/console/instances/{instance}/backups"),
        ]:
            console.go(path)
            assert console.no_horizontal_scroll(), f"{path} scrolls sideways at 390 px"
            console.shot(name)
    finally:
        console.viewport(1280, 800)
