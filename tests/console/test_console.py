"""The console in headless Chromium, page by page, in one session.

The tests run in file order and build on each other: the admin signs in,
backs the instance up, edits its policy, clones it and restores a database
into it (before log backup is turned off); the read-only key comes last.
"""

import os
import re
import subprocess
import time
from datetime import datetime, timedelta

from selenium.webdriver.support.ui import Select

from conftest import answers, psql, strata_json, wait_clone_running, wait_task_finished

LOG_OFF_WARNING = "Disabling log backup permanently deletes all existing log backup files"


def test_sign_in_with_an_access_key_pair(console, env):
    console.go("/")
    console.wait("the sign-in page", lambda: console.path().startswith("/console/signin"))
    key_id, secret = env["admin"]
    console.sign_in(key_id, secret + "x")
    assert "do not match" in console.text(".notice.err")
    assert console.find("input[name=access_key_id]").get_attribute("value") == key_id
    console.shot("sign-in")
    console.sign_in(key_id, secret)
    console.wait("the instances page", lambda: console.path() == "/console/")
    assert key_id in console.text(".whoami")
    # The session cookie is not readable by scripts.
    assert "strata_session" not in console.d.execute_script("return document.cookie")


def test_instances_page_lists_the_instance(console, env):
    row = console.find(f"tr[data-instance='{env['instance']}']")
    cells = [c.text for c in row.find_elements("css selector", "td")]
    assert cells[0] == env["instance"]
    assert re.match(r"127\.0\.0\.1:\d+", cells[1]), cells
    assert cells[2].startswith("15."), cells
    assert "Running" in cells[3] and "Log backup" in cells[3], cells
    assert "GMT+8" in cells[4], cells  # the last backup, in the browser's zone
    assert "MiB" in cells[6], cells
    assert cells[7].startswith("node-"), cells  # the node owning it (a generated id)
    console.shot("instances")


def shown_in_shanghai(time_element):
    """The element shows its UTC datetime attribute as UTC+8."""
    utc = datetime.strptime(time_element.get_attribute("datetime"), "%Y-%m-%dT%H:%M:%SZ")
    local = (utc + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
    return time_element.text.startswith(local) and time_element.get_attribute("title").startswith("UTC: ")


def test_nodes_page_shows_each_node_and_its_health(console, env):
    console.go("/console/")
    node = console.find(f"tr[data-instance='{env['instance']}'] td:nth-child(8)").text
    console.click_through(console.find(".mainnav a[href='/console/nodes']"))
    assert console.path() == "/console/nodes"
    assert console.find(".mainnav a[aria-current=page]").text == "Nodes"
    version = subprocess.run([env["bin"], "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]

    cells = [c.text for c in console.find(f"tr[data-node='{node}']").find_elements("css selector", "td")]
    assert cells[0] == f"{node} (this node)", cells
    assert cells[1] == env["url"].removeprefix("http://"), cells  # the API address it listens on
    assert cells[2] == version, cells
    assert "GMT+8" in cells[3] and "GMT+8" in cells[4], cells  # started, last heartbeat
    assert cells[5] == "Live", cells
    assert cells[6] == "1", cells  # it owns the one instance

    left = os.environ["STRATA_LEFT_NODE"]
    cells = [c.text for c in console.find(f"tr[data-node='{left}']").find_elements("css selector", "td")]
    assert cells[0] == left and cells[1].startswith("127.0.0.1:") and cells[2] == version, cells
    assert cells[4] == "—" and cells[5] == "Left" and cells[6] == "0", cells
    assert "2 nodes share this catalog; 1 live" in console.text(".pagehead")
    console.shot("nodes")


def test_backup_instance_runs_in_the_task_center_and_is_listed(console, env):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/backups")
    console.find("button[data-open=backup-dialog]").click()
    dialog = console.find("#backup-dialog")
    console.wait("the confirmation dialog", lambda: dialog.get_attribute("open") is not None)
    assert instance in dialog.text
    console.click_through(dialog.find_element("css selector", "button[type=submit]"))
    console.wait("the started notice", lambda: console.finds(".notice.ok"))
    notice = console.text(".notice.ok")
    job = re.search(r"Backup task (\d+)", notice).group(1)
    console.click_through(console.find(".notice.ok a"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    console.d.execute_script("window.__notReloaded = true")
    row_css = f"tr[data-task='{job}']"
    console.wait("the task's row", lambda: console.finds(row_css))
    assert console.text(f"{row_css} td[data-f=type]") == "Manually Back Up Instance"

    seen = []
    shot_taken = False

    def progress():
        nonlocal shot_taken
        rows = console.finds(row_css)
        if not rows:
            return False
        status = rows[0].find_element("css selector", "td[data-f=status] .badge").text
        value = int(rows[0].find_element("css selector", "td[data-f=progress]").get_attribute("data-v"))
        if status == "In Progress":
            if not seen or seen[-1] != value:
                seen.append(value)
            if 0 < value < 100 and not shot_taken:
                console.shot("task-center")
                shot_taken = True
        return status in ("Finished", "Failed") and status

    final = console.wait("the backup to finish", progress, timeout=120)
    assert final == "Finished", console.text(row_css)
    assert console.d.execute_script("return window.__notReloaded === true"), "the page was reloaded"
    assert len(set(v for v in seen if v < 100)) >= 2, f"progress did not move: {seen}"
    assert console.text(f"{row_css} .pct") == "100%"
    backup_id = re.search(r"Backup set (\S+)", console.text(f"{row_css} td[data-f=detail]")).group(1)
    if not shot_taken:
        console.shot("task-center")

    # Filters: the finished task is under Finished, not under In Progress.
    console.go("/console/tasks?status=finished&type=manual-backup")
    assert console.finds(row_css)
    console.go("/console/tasks?status=progress")
    assert not console.finds(row_css)

    console.go(f"/console/instances/{instance}/backups")
    row = console.find(f"tr[data-backup='{backup_id}']")
    assert "Success" in row.text and "Manual" in row.text and "Physical" in row.text, row.text
    assert shown_in_shanghai(row.find_element("css selector", "time"))
    listed = {b["id"]: b for b in strata_json(env, "backup", "list", instance)}
    assert listed[backup_id]["mode"] == "Manual" and listed[backup_id]["status"] == "Success"
    console.shot("base-backups")

    # Sortable: oldest first, then newest first.
    header = console.find("#data-backups th:nth-child(2)")
    header.find_element("css selector", "button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    starts = [int(td.get_attribute("data-v")) for td in console.finds("#data-backups tbody td:nth-child(2)")]
    assert len(starts) >= 2 and starts == sorted(starts), starts
    header.find_element("css selector", "button").click()
    starts = [int(td.get_attribute("data-v")) for td in console.finds("#data-backups tbody td:nth-child(2)")]
    assert starts == sorted(starts, reverse=True), starts

    assert_a_cell_per_heading(console, "#data-backups")

    # A time range that ends before it began is refused with the API's words.
    console.go(f"/console/instances/{instance}/backups?from=2026-01-02T00:00Z&to=2026-01-01T00:00Z")
    assert "EndTime must be later than StartTime" in console.text(".notice.err")

    console.go(f"/console/instances/{instance}/backups?view=log")
    console.wait("the log backup list", lambda: console.finds("#log-backups tbody tr"))
    assert_a_cell_per_heading(console, "#log-backups")
    console.shot("log-backups")


def assert_a_cell_per_heading(console, table):
    headings = len(console.finds(f"{table} thead th"))
    cells = len(console.finds(f"{table} tbody tr:first-child td"))
    assert headings > 0 and headings == cells, (table, headings, cells)


def set_days(console, days):
    for box in console.finds("input[name=day]"):
        if box.is_selected() != (box.get_attribute("value") in days):
            box.click()


def set_field(console, css, value):
    field = console.find(css)
    field.clear()
    field.send_keys(value)


def test_policy_is_validated_inline_then_saved(console, env, api):
    instance = env["instance"]
    before = api.backup_policy(instance)
    console.go(f"/console/instances/{instance}/strategy")
    set_days(console, {"Monday"})
    console.click_through(console.find("#save-strategy"))
    console.wait("the inline error", lambda: console.finds("#days-error"))
    error = console.text("#days-error")
    assert "at least two days" in error and "InvalidPreferredBackupPeriod.Malformed" in error, error
    # The form keeps what was entered; nothing was saved.
    assert [b.get_attribute("value") for b in console.finds("input[name=day]:checked")] == ["Monday"]
    assert api.backup_policy(instance) == before
    console.shot("backup-strategy-error")

    # Log retention above data retention: the API's combination rule.
    set_days(console, {"Monday", "Thursday"})
    set_field(console, "#retention", "10")
    set_field(console, "#log_retention", "30")
    console.click_through(console.find("#save-strategy"))
    console.wait("the retention error", lambda: console.finds("#log_retention-error"))
    assert "InvalidParameterCombination" in console.text("#log_retention-error")

    set_field(console, "#log_retention", "8")
    console.find("#window option[value='03:00Z-04:00Z']").click()
    console.click_through(console.find("#save-strategy"))
    console.wait("the saved notice", lambda: console.finds(".notice.ok"))
    assert "Backup policy saved" in console.text(".notice.ok")
    saved = api.backup_policy(instance)
    assert saved["PreferredBackupPeriod"] == "Monday,Thursday", saved
    assert saved["PreferredBackupTime"] == "03:00Z-04:00Z", saved
    assert saved["BackupRetentionPeriod"] == 10 and saved["LogBackupRetentionPeriod"] == 8, saved
    console.d.refresh()
    assert [b.get_attribute("value") for b in console.finds("input[name=day]:checked")] == ["Monday", "Thursday"]
    assert console.find("#retention").get_attribute("value") == "10"
    console.shot("backup-strategy")


def rule_row(console, rule):
    return console.find(f"#rules tr[data-rule='{rule}']")


def set_rule(console, rule, kind=None, value=None, retention=None):
    row = rule_row(console, rule)
    if kind is not None:
        row.find_element("css selector", f"select[name=kind] option[value={kind}]").click()
    for name, text in (("value", value), ("retention", retention)):
        if text is not None:
            field = row.find_element("css selector", f"input[name={name}]")
            field.clear()
            field.send_keys(text)
    return row


def advanced_rules(api, instance):
    return api.policy_answer(instance)["AdvancedDataPolicies"]["AdvancedDataPolicy"]


def test_retention_rules_are_edited_on_the_strategy_page(console, env, api):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/strategy")
    # The instance takes physical backups: high-frequency snapshots are refused.
    console.find("#interval option[value='60']").click()
    console.click_through(console.find("#save-strategy"))
    console.wait("the interval error", lambda: console.finds("#interval-error"))
    error = console.text("#interval-error")
    assert "InvalidBackupInterval.NotSupported" in error and "Flash" in error, error
    assert api.policy_answer(instance)["BackupInterval"] == "-1"

    console.go(f"/console/instances/{instance}/strategy")
    set_field(console, "#keep_last", "3")
    set_field(console, "#archive_days", "90")
    console.find("#archive_policy option[value=ByWeek]").click()
    set_field(console, "#archive_count", "2")
    if not console.find("#advanced").is_selected():
        console.find("#advanced").click()
    console.click_through(console.find("#save-strategy"))
    console.wait("the saved notice", lambda: console.finds(".notice.ok"))
    saved = api.policy_answer(instance)
    assert saved["StrataKeepLastBackups"] == 3, saved
    assert saved["ArchiveBackupRetentionPeriod"] == "90" and saved["ArchiveBackupKeepPolicy"] == "ByWeek", saved
    assert saved["ArchiveBackupKeepCount"] == "2" and saved["AdvancedBackupPolicyEnabled"] is True, saved
    assert console.find("#keep_last").get_attribute("value") == "3"
    assert console.find("#advanced").is_selected()

    # The regular rule comes first and cannot be deleted.
    regular = rule_row(console, "regular")
    assert console.finds("#rules tbody tr")[0] == regular
    assert not regular.find_elements("css selector", "button")
    assert "Monday,Thursday" in regular.text

    set_rule(console, "new", kind="Monthly", value="1,Last", retention="365")
    console.click_through(rule_row(console, "new").find_element("css selector", "button[value=create]"))
    console.wait("the rule added", lambda: console.finds(".notice.ok"))
    rules = advanced_rules(api, instance)
    assert [r["StrategyId"] for r in rules] == ["regular", "monthly-1"], rules
    assert rules[1]["FilterType"] == "Monthly" and rules[1]["RetentionValue"] == 365, rules
    row = rule_row(console, "monthly-1")
    assert row.find_element("css selector", "input[name=value]").get_attribute("value") == rules[1]["FilterValue"]
    assert "Last" in rules[1]["FilterValue"], rules
    console.d.execute_script("document.querySelector('#advanced-rules').scrollIntoView()")
    console.shot("backup-strategy-rules")

    # A day past 31 is refused under the table, with what was entered kept.
    set_rule(console, "new", kind="Monthly", value="32", retention="30")
    console.click_through(rule_row(console, "new").find_element("css selector", "button[value=create]"))
    console.wait("the rule error", lambda: console.finds("#rules-error"))
    assert "Malformed" in console.text("#rules-error"), console.text("#rules-error")
    assert rule_row(console, "new").find_element("css selector", "input[name=value]").get_attribute("value") == "32"
    assert advanced_rules(api, instance) == rules

    set_rule(console, "monthly-1", retention="400")
    console.click_through(rule_row(console, "monthly-1").find_element("css selector", "button[value=update]"))
    console.wait("the rule saved", lambda: console.finds(".notice.ok"))
    assert advanced_rules(api, instance)[1]["RetentionValue"] == 400
    assert set_rule(console, "monthly-1").find_element(
        "css selector", "input[name=retention]").get_attribute("value") == "400"

    console.click_through(rule_row(console, "monthly-1").find_element("css selector", "button[value=delete]"))
    console.wait("the rule deleted", lambda: console.finds(".notice.ok"))
    assert [r["StrategyId"] for r in advanced_rules(api, instance)] == ["regular"]
    assert not console.finds("#rules tr[data-rule='monthly-1']")

    # Back to the regular policy for the tests after this one.
    set_field(console, "#keep_last", "0")
    set_field(console, "#archive_days", "0")
    console.find("#advanced").click()
    console.click_through(console.find("#save-strategy"))
    console.wait("the saved notice", lambda: console.finds(".notice.ok"))
    saved = api.policy_answer(instance)
    assert saved["StrataKeepLastBackups"] == 0 and saved["ArchiveBackupRetentionPeriod"] == "0", saved
    assert saved["AdvancedBackupPolicyEnabled"] is False, saved


def utc(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ")


def ledger_sum(env, port=None, db="postgres", table="ledger"):
    """Row count and a digest of every row, to compare copies."""
    return psql(env, f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t",
                port=port, db=db)


def test_data_backups_show_restore_drill_results(console, env):
    """Every successful backup is drilled (restored and checked with
    pg_amcheck); the list shows the last drill's result, its time on hover."""
    instance = env["instance"]

    def passed():
        time.sleep(1)
        console.go(f"/console/instances/{instance}/backups")
        return [b for b in console.finds("#data-backups td.drill .badge") if b.text == "Passed"]

    badges = console.wait("a passed restore drill", passed, timeout=240)
    header = [th.text for th in console.finds("#data-backups thead th")]
    assert "Restore Drill" in header, header
    assert "ok" in badges[0].get_attribute("class").split()
    hover = badges[0].get_attribute("title")
    # Local time first, then UTC, then what the drill checked.
    at = utc(badges[0].get_attribute("data-utc"))
    local = (at + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
    assert hover.startswith(local) and "UTC: " in hover and "pg_amcheck clean" in hover, hover
    console.shot("base-backups-drills")


def successful_sets(console, instance):
    """The Data Backup list's successful sets, oldest first."""
    console.go(f"/console/instances/{instance}/backups")
    rows = [r for r in console.finds("#data-backups tr[data-backup]")
            if "Success" in r.find_element("css selector", "td .badge").text]
    return sorted(rows, key=lambda r: int(r.find_elements("css selector", "td")[1].get_attribute("data-v")))


def test_a_set_is_kept_by_hand_then_released(console, env, api):
    """A set neither newest nor the recovery base shows what keeps it: the
    keep by hand while it lasts, the regular retention after release."""
    instance = env["instance"]
    if len(successful_sets(console, instance)) < 3:
        api.create_backup(instance)

    def three():
        time.sleep(1)
        rows = successful_sets(console, instance)
        return rows if len(rows) >= 3 else None

    sets = console.wait("three successful sets", three, timeout=240)
    header = [th.text for th in console.finds("#data-backups thead th")]
    assert "Kept By" in header and "Expected Expiry" in header, header
    middle = sets[1].get_attribute("data-backup")
    row = sets[1]
    assert row.find_element("css selector", "td.kept .keptby").text, row.text

    until = (datetime.utcnow() + timedelta(days=400)).strftime("%Y-%m-%d")
    row.find_element("css selector", "details.keepform summary").click()
    form = row.find_element("css selector", "details.keepform form")
    console.d.execute_script("arguments[0].value = arguments[1]", form.find_element("css selector", "input[name=until]"), until)
    form.find_element("css selector", "input[name=note]").send_keys("audit")
    console.click_through(form.find_element("css selector", "button[value=keep]"))
    console.wait("the kept notice", lambda: console.finds(".notice.ok"))
    assert f"{middle} kept" in console.text(".notice.ok")
    row = console.find(f"#data-backups tr[data-backup='{middle}']")
    assert row.find_element("css selector", "td.kept .keptby").text == f"kept until {until}T00:00:00Z (audit)", row.text
    expiry = row.find_element("css selector", "td.expiry time").get_attribute("datetime")
    assert expiry == f"{until}T00:00:00Z", expiry
    assert "audit" in row.find_element("css selector", "td.kept .keep").text
    console.shot("base-backups-kept")

    console.click_through(row.find_element("css selector", "button[value=release]"))
    console.wait("the released notice", lambda: console.finds(".notice.ok"))
    assert f"{middle} released" in console.text(".notice.ok")
    row = console.find(f"#data-backups tr[data-backup='{middle}']")
    assert not row.find_element("css selector", "td.kept .keptby").text.startswith("kept until"), row.text
    assert row.find_elements("css selector", "details.keepform")


def test_restore_refuses_a_time_outside_the_window_inline(console, env):
    instance = env["instance"]
    tasks_before = len(strata_json(env, "task", "list", instance))
    console.go(f"/console/instances/{instance}/restore")
    form = console.find("#clone-form")
    assert not console.find("#clone-time").is_displayed()
    form.find_element("css selector", "input[value=BackupTime]").click()
    assert console.find("#clone-time").is_displayed()
    assert not console.find("#clone-set").is_displayed()
    bounds = console.finds("#clone-window time")
    assert len(bounds) == 2 and all(shown_in_shanghai(t) for t in bounds), console.text("#clone-form")
    picker = console.find("#clone-time")
    begin = utc(picker.get_attribute("data-min-utc"))
    end = utc(picker.get_attribute("data-max-utc"))
    assert begin == utc(bounds[0].get_attribute("datetime")) and end == utc(bounds[1].get_attribute("datetime"))
    # The picker is bounded in the browser's zone.
    assert picker.get_attribute("min") == (begin + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S")
    assert picker.get_attribute("max") == (end + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S")

    before = begin - timedelta(days=1)
    console.d.execute_script(
        "arguments[0].value = arguments[1]", picker, (before + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S"))
    console.click_through(console.find("#clone-submit"))
    console.wait("the inline error", lambda: console.finds("#clone-time-error"))
    error = console.text("#clone-time-error")
    assert "outside the recoverable window" in error and "InvalidRestoreTime" in error, error
    # The time was sent in UTC and is kept for correcting it.
    assert before.strftime("%Y-%m-%dT%H:%M:%SZ") in error, error
    # (The browser drops ":00" seconds from the value, so compare times.)
    kept = datetime.fromisoformat(console.find("#clone-time").get_attribute("value"))
    assert kept == datetime.fromisoformat((before + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S")), kept
    assert console.find("#clone-form input[value=BackupTime]").is_selected()
    assert len(strata_json(env, "task", "list", instance)) == tasks_before
    console.shot("restore-time-refused")


def test_clone_by_backup_set_becomes_a_running_instance(console, env, api):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/restore")
    newest = console.find("#clone-set option")
    backup_id = newest.get_attribute("value")
    assert newest.is_selected() and "GMT+8" in newest.text and newest.get_attribute("title").startswith("UTC: ")
    assert not console.find("#clone-time").is_displayed()
    console.shot("restore")
    console.click_through(console.find("#clone-submit"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    clone = re.search(r"New instance (\S+) is being created", notice).group(1)
    try:
        row = wait_task_finished(console, "Clone to New Instance")
        assert row.find_element("css selector", "td[data-f=instance]").text == instance
        assert backup_id in row.find_element("css selector", "td[data-f=detail]").text

        row = wait_clone_running(console, clone)
        cells = [c.text for c in row.find_elements("css selector", "td")]
        assert f"Clone of {instance}" in cells[3], cells
        port = int(re.match(r"127\.0\.0\.1:(\d+)$", cells[1]).group(1))
        console.shot("instances-with-clone")
        assert ledger_sum(env, port=port) == ledger_sum(env)
        assert ledger_sum(env, port=port, db="shop", table="orders") == ledger_sum(env, db="shop", table="orders")
    finally:
        api.delete_instance(clone)
    console.go("/console/")
    assert not console.finds(f"tr[data-instance='{clone}']")
    assert not answers(env, port), f"the deleted clone still answers on port {port}"


def test_restore_a_database_into_the_original(console, env):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/restore")
    # The chosen set's databases, as DescribeBackupDatabase lists them, are offered in each row.
    sets = console.finds("#db-set option")
    offered = lambda: {o.get_attribute("value") for o in console.finds("#db-choices option")}
    assert {"postgres", "shop"} <= offered(), offered()
    assert console.find("#db-form input[name=db_name]").get_attribute("list") == "db-choices"
    assert f"Backup set {sets[0].get_attribute('value')} holds" in console.text("#db-choices-hint")
    # Another set chosen: its own list replaces the first.
    oldest = sets[-1].get_attribute("value")
    Select(console.find("#db-set")).select_by_value(oldest)
    console.wait("the oldest set's databases", lambda: f"Backup set {oldest} holds" in console.text("#db-choices-hint"))
    assert "postgres" in offered()
    Select(console.find("#db-set")).select_by_value(sets[0].get_attribute("value"))
    names = console.finds("#db-form input[name=db_name]")
    new_names = console.finds("#db-form input[name=db_newname]")
    names[0].send_keys("shop")
    new_names[0].send_keys("shop")  # exists: refused like the API refuses it
    console.click_through(console.find("#db-submit"))
    console.wait("the inline error", lambda: console.finds("#db-databases-error"))
    error = console.text("#db-databases-error")
    assert "already exists" in error and "InvalidDBName.Duplicate" in error, error
    assert console.find("#db-form input[name=db_name]").get_attribute("value") == "shop"

    # Now by point in time: the newest recoverable moment, picked in local time.
    set_field(console, "#db-form input[name=db_newname]", "shop_restored")
    console.find("#db-form input[value=BackupTime]").click()
    picker = console.find("#db-time")
    latest = utc(picker.get_attribute("data-max-utc"))
    assert picker.get_attribute("max") == (latest + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S")
    console.d.execute_script("arguments[0].value = arguments[0].max", picker)
    console.click_through(console.find("#db-submit"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    assert "shop as shop_restored" in notice, notice
    job = re.search(r"Restore task (\d+) started", notice).group(1)
    wait_task_finished(console, "Restore Databases or Tables", job=job)
    assert ledger_sum(env, db="shop_restored", table="orders") == ledger_sum(env, db="shop", table="orders")
    assert "shop_restored" in psql(env, "SELECT datname FROM pg_database").split()


def test_turning_log_backup_off_warns_before_it_applies(console, env, api):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/strategy")
    box = console.find("#log-backup")
    assert box.is_selected()
    box.click()
    assert "active" in console.find("#log-off-warning").get_attribute("class")
    console.find("#save-strategy").click()
    dialog = console.find("#log-off-dialog")
    console.wait("the warning dialog", lambda: dialog.get_attribute("open") is not None)
    assert LOG_OFF_WARNING in dialog.text
    console.shot("log-backup-off-warning")
    dialog.find_element("css selector", "button[data-close]").click()
    console.wait("the dialog to close", lambda: dialog.get_attribute("open") is None)
    assert str(api.backup_policy(instance)["EnableBackupLog"]) == "1", "applied before confirming"
    # Without the script's dialog the server asks for the confirmation itself.
    status, body = console.d.execute_async_script(
        """
        const done = arguments[0];
        const form = document.querySelector('form.strategy');
        fetch(form.action, {method: 'POST', body: new URLSearchParams(new FormData(form))})
          .then(r => r.text().then(t => done([r.status, t])));
        """
    )
    assert status == 200 and 'id="log-off-confirm"' in body and LOG_OFF_WARNING in body, body
    assert str(api.backup_policy(instance)["EnableBackupLog"]) == "1", "applied without confirmation"

    console.find("#save-strategy").click()
    console.wait("the warning dialog", lambda: dialog.get_attribute("open") is not None)
    console.click_through(dialog.find_element("css selector", "button[name=confirm_log_off]"))
    console.wait("the saved notice", lambda: console.finds(".notice.ok"))
    assert "Log backup is off" in console.text(".notice.ok")
    assert str(api.backup_policy(instance)["EnableBackupLog"]) == "0"
    assert "Off" in console.text(".facts")


def test_storage_tab(console, env, api):
    instance = env["instance"]
    console.go(f"/console/instances/{instance}/storage")
    assert console.finds("svg.chart path.area.data") and console.finds("svg.chart path.area.log")
    assert console.finds("svg.chart path.quota"), "no free quota line"
    assert "of data in the sets" in console.text(".figures")
    assert "200% of the database size" in console.text(".figures")

    def page_shows_the_api_figures():
        usage = api.storage_usage(instance)
        console.go(f"/console/instances/{instance}/storage")
        quota = int(console.find("#usage-quota").get_attribute("data-bytes"))
        excess = int(console.find("#usage-excess").get_attribute("data-bytes"))
        return usage["FreeQuota"] > 0 and (quota, excess) == (usage["FreeQuota"], usage["ExcessSize"])

    console.wait("the quota and excess of the API's newest sample", page_shows_the_api_figures)
    assert "GB-hours billable" in console.text("#usage-gb-hours")
    console.shot("storage")


def test_pages_fit_a_narrow_screen(console, env):
    instance = env["instance"]
    console.viewport(390, 844, mobile=True)
    try:
        for name, path in [
            ("narrow-instances", "/console/"),
            ("narrow-base-backups", f"/console/instances/{instance}/backups"),
            ("narrow-backup-strategy", f"/console/instances/{instance}/strategy"),
            ("narrow-restore", f"/console/instances/{instance}/restore"),
            ("narrow-task-center", "/console/tasks"),
        ]:
            console.go(path)
            assert console.no_horizontal_scroll(), f"{path} scrolls sideways at 390 px"
            console.shot(name)
    finally:
        console.viewport(1280, 800)


def test_read_only_key_sees_no_buttons_that_change_things(console, env):
    instance = env["instance"]
    tasks_before = len(strata_json(env, "task", "list", instance))
    console.sign_out()
    console.sign_in(*env["reader"])
    console.wait("the instances page", lambda: console.path() == "/console/")
    assert "read-only" in console.text(".whoami")
    console.go(f"/console/instances/{instance}/backups")
    assert not console.finds("button[data-open=backup-dialog]")
    assert not console.finds("#data-backups td.kept form")
    assert not console.finds("#data-backups td.clone form")
    console.go(f"/console/instances/{instance}/strategy")
    assert not console.finds("#save-strategy")
    assert not console.finds("#rules button") and not console.finds("#rules tr[data-rule=new]")
    assert all(f.get_attribute("disabled") is not None for f in console.finds("fieldset.card"))
    console.shot("read-only-strategy")
    console.go(f"/console/instances/{instance}/restore")
    assert not console.finds("#clone-submit") and not console.finds("#db-submit")
    assert all(f.get_attribute("disabled") is not None for f in console.finds("fieldset.card"))
    assert "read-only" in console.text(".notice.info")

    # The server refuses anyway: a forged POST with the session's own token,
    # and one without it.
    post = """
        const [url, token, done] = arguments;
        fetch(url, {method: 'POST', body: new URLSearchParams({csrf: token})})
          .then(r => r.text().then(t => done([r.status, t])));
    """
    token = console.find("input[name=csrf]").get_attribute("value")
    status, body = console.d.execute_async_script(post, f"/console/instances/{instance}/backup", token)
    assert "Forbidden.ReadOnlyAccessKey" in body, body
    status, body = console.d.execute_async_script(post, f"/console/instances/{instance}/strategy", token)
    assert status == 403 and "read-only" in body, (status, body)
    status, body = console.d.execute_async_script(
        """
        const [url, token, done] = arguments;
        fetch(url, {method: 'POST', body: new URLSearchParams({csrf: token, op: 'delete', rule: 'any'})})
          .then(r => r.text().then(t => done([r.status, t])));
        """, f"/console/instances/{instance}/strategy/rules", token)
    assert status == 403 and "Forbidden.ReadOnlyAccessKey" in body, (status, body)
    for form in ("clone", "databases"):
        status, body = console.d.execute_async_script(
            post, f"/console/instances/{instance}/restore/{form}", token)
        assert status == 403 and "Forbidden.ReadOnlyAccessKey" in body, (form, status, body)
    status, body = console.d.execute_async_script(post, f"/console/instances/{instance}/backup", "forged")
    assert status == 403 and "Request refused" in body, (status, body)
    assert len(strata_json(env, "task", "list", instance)) == tasks_before

