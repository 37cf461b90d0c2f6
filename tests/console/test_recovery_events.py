"""Recovery events on the console's Restore tab, in headless Chromium.

A table of 1500 rows is emptied by one DELETE (and written to after it); the
DELETE is found as a marker on the timeline and as a row of the list,
narrowed by the filters and the zoom, undone with "Restore table as it was
just before" and cloned to just before. A 10-row DELETE, below the default
1000-row threshold, is not an event. A read-only key sees the events without
the buttons. The tests run in file order.
"""

import re
import time

import pytest

from conftest import psql, wait_clone_running, wait_task_finished

TABLE = "ev_ledger"
SMALL = "ev_small"
RESTORED_NOTE = "written after the delete"


def digest(env, table, port=None):
    """Row count and a digest of every row, to compare copies."""
    return psql(
        env,
        f"SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t",
        port=port,
    )


@pytest.fixture(scope="module")
def deleted(env):
    """The large DELETE's xid and the table's digest just before it."""
    psql(env, f"CREATE TABLE {SMALL} (id int PRIMARY KEY, v text); "
              f"INSERT INTO {SMALL} SELECT g, md5(g::text) FROM generate_series(1, 20) g")
    psql(env, f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text); "
              f"INSERT INTO {TABLE} SELECT g, md5(g::text) FROM generate_series(1, 1500) g")
    # The receiver reads the new tables' names after their commit; the
    # wait also makes the recoverable window (from the first backup, just
    # before these tests) long enough to zoom into.
    time.sleep(6)
    psql(env, f"DELETE FROM {SMALL} WHERE id <= 10")
    before = digest(env, TABLE)
    out = psql(env, f"WITH d AS (DELETE FROM {TABLE} RETURNING 1) SELECT txid_current(), count(*) FROM d")
    xid, rows = out.split("|")
    assert rows == "1500", out
    psql(env, f"INSERT INTO {TABLE} VALUES (1, '{RESTORED_NOTE}')")
    return xid, before


def restore_tab(console, env, query=""):
    console.go(f"/console/instances/{env['instance']}/restore{query}")


def event_row(console, xid):
    rows = console.finds(f"#event-list tr[data-xid='{xid}'][data-kind=Delete]")
    return rows[0] if rows else None


def marker(console, xid):
    found = console.finds(f"svg.strip a.marker[data-xid='{xid}']")
    return found[0] if found else None


def cells(row):
    return {f: row.find_element("css selector", f"td[data-f={f}]").text
            for f in ("kind", "time", "db", "table", "rows", "xid")}


def test_sign_in(console, env):
    console.sign_in(*env["admin"])
    console.wait("the instances page", lambda: console.path() == "/console/")


def test_a_large_delete_is_on_the_timeline_and_in_the_list(console, env, deleted):
    xid, _ = deleted

    def shown():
        restore_tab(console, env)
        if event_row(console, xid) and marker(console, xid):
            return True
        time.sleep(0.5)
        return False

    console.wait("the DELETE in the list and on the timeline", shown, timeout=120)
    got = cells(event_row(console, xid))
    assert got["kind"] == "Delete" and got["rows"] == "1500" and got["xid"] == xid, got
    assert (got["db"], got["table"]) == ("postgres", f"public.{TABLE}"), got
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", got["time"]), got
    # The 10-row DELETE is below the threshold.
    listed = [c.text for c in console.finds("#event-list td[data-f=table]")]
    assert f"public.{SMALL}" not in listed, listed

    # A marker focused (as by the keyboard) or pointed at is described.
    info = console.find("#timeline-info")
    console.d.execute_script("arguments[0].focus()", marker(console, xid))
    console.wait("the marker's details", lambda: f"xid {xid}" in info.text)
    for part in ("Delete", got["time"], f"public.{TABLE}", "1500 rows"):
        assert part in info.text, info.text
    console.shot("restore-events")


def test_filters_narrow_the_list_and_the_timeline(console, env, deleted):
    xid, _ = deleted
    restore_tab(console, env)
    field = console.find("#event-filters input[name=table]")
    field.clear()
    field.send_keys(SMALL)
    console.click_through(console.find("#event-search"))
    assert console.finds("#events-empty") and not console.finds("svg.strip a.marker")

    field = console.find("#event-filters input[name=table]")
    field.clear()
    field.send_keys(TABLE)
    console.click_through(console.find("#event-search"))
    assert f"table={TABLE}" in console.path()
    strip = console.find("#timeline")
    seen = (strip.get_attribute("data-from"), strip.get_attribute("data-to"), console.text("#event-list"))
    rows = console.finds("#event-list tbody tr")
    assert [r.get_attribute("data-xid") for r in rows] == [xid], seen
    assert [m.get_attribute("data-xid") for m in console.finds("svg.strip a.marker")] == [xid], seen

    # Zoom into the quarter holding the event: the strip is narrower, the
    # table filter is kept and the marker is still there.
    strip = console.find("#timeline")
    whole = (strip.get_attribute("data-from"), strip.get_attribute("data-to"))
    at = marker(console, xid).get_attribute("data-utc")
    quarters = [(q.get_attribute("data-from"), q.get_attribute("data-to"), q) for q in console.finds(".quarters a.quarter")]
    holding = [q for f, t, q in quarters if f <= at <= t]
    assert holding, (whole, at, [(f, t) for f, t, _ in quarters])
    quarter = holding[0]
    console.click_through(quarter)
    strip = console.find("#timeline")
    zoomed = (strip.get_attribute("data-from"), strip.get_attribute("data-to"))
    assert whole[0] <= zoomed[0] and zoomed[1] <= whole[1] and zoomed != whole, (whole, zoomed)
    assert f"table={TABLE}" in console.path() and marker(console, xid) is not None
    assert [r.get_attribute("data-xid") for r in console.finds("#event-list tbody tr")] == [xid]
    console.click_through(console.find("#zoom-all"))
    strip = console.find("#timeline")
    assert (strip.get_attribute("data-from"), strip.get_attribute("data-to")) == whole


def open_dialog(console, xid, op):
    row = event_row(console, xid)
    row.find_element("css selector", f"button[data-op={op}]").click()
    dialog = row.find_element("css selector", f"dialog[id$='-{op}']")
    console.wait("the dialog", lambda: dialog.get_attribute("open") is not None)
    return dialog


def test_restore_table_as_it_was_just_before(console, env, deleted):
    xid, before = deleted
    restored = f"{TABLE}_before_{xid}"
    restore_tab(console, env, f"?table={TABLE}")
    dialog = open_dialog(console, xid, "table")
    assert dialog.find_element("css selector", "input[name=newname]").get_attribute("value") == restored
    console.click_through(dialog.find_element("css selector", "button[data-submit=table]"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    assert f"just before transaction {xid}" in notice and f"public.{restored}" in notice, notice
    job = re.search(r"Restore task (\d+) started", notice).group(1)
    wait_task_finished(console, "Restore Databases or Tables", job=job)
    assert digest(env, restored) == before
    assert psql(env, f"SELECT count(*) || '|' || min(v) FROM {TABLE}") == f"1|{RESTORED_NOTE}"

    # The same name again: the service's refusal, shown on the tab.
    restore_tab(console, env, f"?table={TABLE}")
    console.click_through(open_dialog(console, xid, "table").find_element("css selector", "button[data-submit=table]"))
    error = console.text("#event-error")
    assert "already exists" in error and "InvalidTableName.Duplicate" in error, error


def test_clone_to_just_before(console, env, api, deleted):
    xid, before = deleted
    restore_tab(console, env, f"?table={TABLE}")
    console.click_through(open_dialog(console, xid, "clone").find_element("css selector", "button[data-submit=clone]"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    assert f"just before transaction {xid}" in notice, notice
    clone = re.search(r"New instance (\S+) is being created", notice).group(1)
    try:
        console.go("/console/")
        row = console.find(f"tr[data-instance='{clone}']")
        assert f"Clone of {env['instance']}" in row.text, row.text
        console.go(f"/console/tasks?instance={env['instance']}")
        wait_task_finished(console, "Clone to New Instance")

        row = wait_clone_running(console, clone)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", row.text).group(1))
        assert digest(env, TABLE, port=port) == before
    finally:
        api.delete_instance(clone)


def test_read_only_key_sees_events_but_no_restore_buttons(console, env, deleted):
    xid, _ = deleted
    console.sign_out()
    console.sign_in(*env["reader"])
    console.wait("the instances page", lambda: console.path() == "/console/")
    restore_tab(console, env, f"?table={TABLE}")
    assert event_row(console, xid) is not None and marker(console, xid) is not None
    assert not console.finds("#event-list button[data-op]") and not console.finds("#event-list dialog")
    # The server refuses a forged restore anyway.
    token = console.find("input[name=csrf]").get_attribute("value")
    status, body = console.d.execute_async_script(
        """
        const [url, token, xid, done] = arguments;
        fetch(url, {method: 'POST', body: new URLSearchParams({csrf: token, op: 'clone', xid: xid})})
          .then(r => r.text().then(t => done([r.status, t])));
        """, f"/console/instances/{env['instance']}/restore/event", token, xid)
    assert status == 403 and "Forbidden.ReadOnlyAccessKey" in body, (status, body)
