"""Snapshot backup sets in the console, on an instance registered with its
`strata agent` (PostgreSQL on a loop-mounted XFS, see
crates/strata/tests/console.rs): a snapshot backup taken from the Backup
Instance dialog is listed with its method, and the list's Clone action makes
an instant clone through the agent that answers SQL with the rows of the
backup."""

import os
import re
import time

from conftest import answers, psql, wait_clone_running


def snapshot_row(console, instance):
    """The newest Snapshot set's row in the Data Backup list, once it succeeded."""
    console.go(f"/console/instances/{instance}/backups")
    rows = [r for r in console.finds("#data-backups tr[data-backup]")
            if r.find_element("css selector", "td.method").get_attribute("data-v") == "Snapshot"
            and "Success" in r.find_element("css selector", "td .badge").text]
    return max(rows, key=lambda r: int(r.find_elements("css selector", "td")[1].get_attribute("data-v")),
               default=None)


def test_a_snapshot_set_is_listed_with_its_method_and_clones_through_the_agent(console, env, api):
    instance = env["instance"]
    clone_dir = env_path("STRATA_AGENT_CLONE_DIR")
    console.sign_in(*env["admin"])
    console.wait("the instances page", lambda: console.path() == "/console/")

    # A snapshot backup from the Backup Instance dialog.
    console.go(f"/console/instances/{instance}/backups")
    console.find("button[data-open=backup-dialog]").click()
    dialog = console.find("#backup-dialog")
    dialog.find_element("css selector", "input[name=method][value=Snapshot]").click()
    console.click_through(dialog.find_element("css selector", "button[type=submit]"))
    console.wait("the started notice", lambda: console.finds(".notice.ok"))
    assert "Backup task" in console.text(".notice.ok"), console.text(".notice.ok")

    def listed():
        time.sleep(1)
        return snapshot_row(console, instance)

    row = console.wait("a successful snapshot set", listed, timeout=180)
    header = [th.text for th in console.finds("#data-backups thead th")]
    assert "Method" in header and "Clone" in header, header
    method = row.find_element("css selector", "td.method").text
    assert method.startswith("Snapshot") and "on the database host" in method, method
    backup_id = row.get_attribute("data-backup")
    console.shot("snapshot-set")

    # Rows committed after the backup are not in its clone.
    before = psql(env, "SELECT count(*) FROM ledger")
    psql(env, "INSERT INTO ledger SELECT g, 'after' FROM generate_series(1001, 1200) g")

    console.click_through(row.find_element("css selector", "td.clone button[type=submit]"))
    console.wait("the Task Center", lambda: console.path().startswith("/console/tasks"))
    notice = console.text(".notice.ok")
    clone = re.search(r"New instance (\S+) is being created", notice).group(1)
    try:
        row = wait_clone_running(console, clone)
        cells = [c.text for c in row.find_elements("css selector", "td")]
        assert f"Clone of {instance}" in cells[3], cells
        port = int(re.match(r"127\.0\.0\.1:(\d+)$", cells[1]).group(1))
        console.shot("instances-with-snapshot-clone")

        # Made by the agent from the snapshot: its data directory is in the agent's clone
        # directory, and it is listed as the agent's clone of that set.
        assert os.path.isfile(os.path.join(clone_dir, clone, "PG_VERSION")), os.listdir(clone_dir)
        listed_clone = [i for i in api._curl("DescribeDBInstances")["Items"]["DBInstance"]
                        if i["DBInstanceId"] == clone]
        assert listed_clone and listed_clone[0]["StrataAgentClone"] == clone, listed_clone
        console.go(f"/console/tasks?instance={instance}")
        tasks = [r.text for r in console.finds("tr[data-task]") if backup_id in r.text]
        assert tasks, "no task names the cloned set"

        # It answers SQL with the source's rows as of the backup.
        assert psql(env, "SELECT count(*) FROM ledger", port=port) == before
        assert psql(env, "SELECT count(*) FROM ledger WHERE id > 1000", port=port) == "0"
        assert psql(env, "SELECT md5(string_agg(note, ',' ORDER BY id)) FROM ledger WHERE id <= 300",
                    port=port) == psql(env, "SELECT md5(string_agg(note, ',' ORDER BY id)) FROM ledger WHERE id <= 300")
        assert psql(env, "SELECT pg_is_in_recovery()", port=port) == "f"
    finally:
        api.delete_instance(clone)
    assert not os.path.exists(os.path.join(clone_dir, clone))
    assert not answers(env, port), f"the deleted clone still answers on port {port}"


def env_path(name):
    value = os.environ.get(name)
    assert value, f"{name} is not set: run with `cargo test -p strata --test console`"
    return value
