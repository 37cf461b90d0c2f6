"""User backups through the official SDK: a `pg_basebackup -Ft` directory
placed in the import directory, imported with ImportUserBackupFile, listed,
changed and deleted; a clone of it compared with the data at backup time;
hostile and wrong BackupFile names refused with nothing recorded; unknown
ids; read-only keys kept to ListUserBackupFiles.

The harness (crates/strata/tests/api.rs) configures `import.dir` and passes
it as STRATA_IMPORT_DIR."""

import os
import shutil
import subprocess
import time

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

PG_BIN = "/usr/lib/postgresql/15/bin"
TABLE = "ub_ledger"
REGION = "local"


def as_postgres(cmd):
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=120)


def psql_at(port, sql, host="127.0.0.1"):
    out = as_postgres([f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                       "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres", "-c", sql])
    assert out.returncode == 0, f"psql on port {port} failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def fingerprint(port, host="127.0.0.1"):
    return psql_at(port, f"SELECT count(*), max(id), md5(string_agg(note, ',' ORDER BY id)) FROM {TABLE}",
                   host=host)


def import_dir():
    return h.env("STRATA_IMPORT_DIR")


def basebackup(name):
    """`pg_basebackup -Ft -X stream` of the test server into the import
    directory as `name`."""
    target = os.path.join(import_dir(), name)
    out = as_postgres([f"{PG_BIN}/pg_basebackup", "-h", h.pg_host(), "-p", str(h.pg_port()),
                       "-U", "postgres", "-D", target, "-Ft", "-X", "stream", "-c", "fast"])
    assert out.returncode == 0, out.stderr
    return target


@pytest.fixture(scope="module")
def source():
    """A basebackup taken after 300 rows, then 200 more rows committed;
    returns (directory name, the table's fingerprint at backup time)."""
    h.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int PRIMARY KEY, note text);"
           f"INSERT INTO {TABLE} SELECT g, md5(g::text) FROM generate_series(1, 300) g;")
    at_backup = fingerprint(h.pg_port(), host=h.pg_host())
    basebackup("nightly-1")
    h.psql(f"INSERT INTO {TABLE} SELECT g, md5(g::text) FROM generate_series(301, 500) g;")
    assert fingerprint(h.pg_port(), host=h.pg_host()) != at_backup
    return "nightly-1", at_backup


def records(client, **kw):
    body = client.list_user_backup_files(rds.ListUserBackupFilesRequest(region_id=REGION, **kw)).body
    return body.records


def raw_records(client, **kw):
    return h.call(client, "ListUserBackupFiles", RegionId=REGION, **kw)["Records"]


def import_file(client, name, **kw):
    resp = client.import_user_backup_file(
        rds.ImportUserBackupFileRequest(backup_file=name, region_id=REGION, **kw))
    assert resp.status_code == 200
    assert resp.body.backup_id and resp.body.status == "Importing", resp.body.to_map()
    return resp.body.backup_id


def wait_imported(client, backup_id, timeout=h.JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        found = records(client, backup_id=backup_id)
        assert len(found) == 1, [r.to_map() for r in found]
        if found[0].status != "Importing":
            assert found[0].status == "BackupSuccess", found[0].to_map()
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"user backup {backup_id} still importing after {timeout}s")
        time.sleep(0.3)


def attribute(client, instance_id):
    body = h.call(client, "DescribeDBInstanceAttribute", DBInstanceId=instance_id)
    return body["Items"]["DBInstanceAttribute"][0]


def wait_running(client, instance_id, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        a = attribute(client, instance_id)
        if a["DBInstanceStatus"] in ("Running", "Failed"):
            assert a["DBInstanceStatus"] == "Running", a
            return a
        if time.monotonic() > deadline:
            pytest.fail(f"{instance_id} not running after {timeout}s: {a}")
        time.sleep(0.5)


def test_import_list_update_delete(source, client, sig):
    name, _ = source
    before = {r.backup_id for r in records(client)}
    started = int(time.time() * 1000)
    backup_id = import_file(client, name, comment=f"from {sig}", retention=7, engine_version="15.0")
    assert backup_id not in before
    r = wait_imported(client, backup_id)
    assert r.comment == f"from {sig}"
    assert r.retention == 7
    assert r.engine == "PostgreSQL" and r.engine_version == "15.0"
    assert started - 1000 <= int(r.creation_time) <= int(r.finish_time) <= int(time.time() * 1000)
    assert r.oss_file_size > 0 and not r.reason
    raw = raw_records(client, BackupId=backup_id)[0]
    assert raw["StrataProcess"] == "100%", raw

    # Filters: status, comment (a substring), id.
    assert backup_id in {x.backup_id for x in records(client, status="BackupSuccess")}
    assert backup_id not in {x.backup_id for x in records(client, status="Failed")}
    assert [x.backup_id for x in records(client, comment=f"om {sig}")] == [backup_id]

    resp = client.update_user_backup_file(rds.UpdateUserBackupFileRequest(
        backup_id=backup_id, comment="kept for the audit", retention=30, region_id=REGION))
    assert resp.body.backup_id == backup_id
    r = records(client, backup_id=backup_id)[0]
    assert (r.comment, r.retention) == ("kept for the audit", 30)
    h.expect_error("InvalidRetention.Malformed", 400, client.update_user_backup_file,
                   rds.UpdateUserBackupFileRequest(backup_id=backup_id, retention=0, region_id=REGION))
    h.expect_error("InvalidComment.Malformed", 400, client.update_user_backup_file,
                   rds.UpdateUserBackupFileRequest(backup_id=backup_id, comment="a\nb", region_id=REGION))
    assert (records(client, backup_id=backup_id)[0].comment) == "kept for the audit"

    resp = client.delete_user_backup_file(
        rds.DeleteUserBackupFileRequest(backup_id=backup_id, region_id=REGION))
    assert resp.body.backup_id == backup_id
    assert records(client, backup_id=backup_id) == []
    assert backup_id not in {x.backup_id for x in records(client)}
    # The set went with it: nothing restores from it any more.
    h.expect_error("InvalidBackupSetID.NotFound", 404, client.clone_dbinstance,
                   rds.CloneDBInstanceRequest(backup_id=backup_id))
    h.expect_error("InvalidBackupId.NotFound", 404, client.delete_user_backup_file,
                   rds.DeleteUserBackupFileRequest(backup_id=backup_id, region_id=REGION))
    # The file stays where the user put it.
    assert os.path.isfile(os.path.join(import_dir(), name, "base.tar"))


def test_clone_of_a_user_backup_has_the_data_at_backup_time(source, admin):
    name, at_backup = source
    backup_id = import_file(admin, name, comment="to clone")
    wait_imported(admin, backup_id)
    # Not a detached instance's set: DescribeDetachedBackups leaves it out.
    detached = h.call(admin, "DescribeDetachedBackups", Region=REGION)
    assert backup_id not in {b["BackupId"] for b in detached["Items"]["Backup"]}
    for client in (h.make_client("v3", *h.admin_key()), h.make_client("v2", *h.admin_key())):
        clone_id = client.clone_dbinstance(rds.CloneDBInstanceRequest(backup_id=backup_id)).body.dbinstance_id
        a = wait_running(client, clone_id)
        assert fingerprint(int(a["Port"])) == at_backup
        assert fingerprint(h.pg_port(), host=h.pg_host()) != at_backup
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone_id))
    admin.delete_user_backup_file(rds.DeleteUserBackupFileRequest(backup_id=backup_id, region_id=REGION))


def test_bad_backup_files_are_refused_with_nothing_recorded(source, client, tmp_path):
    name, _ = source
    root = import_dir()
    outside = tmp_path / "outside"
    shutil.copytree(os.path.join(root, name), outside)
    for link, target in (("escape", "/etc"), ("link-out", str(outside)),
                         ("link-in", os.path.join(root, name))):
        if not os.path.lexists(os.path.join(root, link)):
            os.symlink(target, os.path.join(root, link))
    os.makedirs(os.path.join(root, "junk"), exist_ok=True)
    with open(os.path.join(root, "junk", "base.tar"), "wb") as f:
        f.write(b"this is not a tar archive\n" * 100)
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    with open(os.path.join(root, "plain-file"), "wb") as f:
        f.write(b"x")
    before = [r.backup_id for r in records(client)]
    for bad in ("../" + name, "/etc", f"{root}/{name}", "..", ".", "a/b", "x\x01y", "x\ny",
                ".hidden", "n" * 300, "escape", "link-out", "link-in", "plain-file", "na'me",
                "$(touch /tmp/pwned)"):
        h.expect_error("InvalidBackupFile.Malformed", 400, client.import_user_backup_file,
                       rds.ImportUserBackupFileRequest(backup_file=bad, region_id=REGION))
    h.expect_error("InvalidBackupFile.NotFound", 400, client.import_user_backup_file,
                   rds.ImportUserBackupFileRequest(backup_file="absent", region_id=REGION))
    for not_a_backup in ("junk", "empty"):
        h.expect_error("InvalidParameter", 400, client.import_user_backup_file,
                       rds.ImportUserBackupFileRequest(backup_file=not_a_backup, region_id=REGION))
    h.expect_error("MissingParameter", 400, client.import_user_backup_file,
                   rds.ImportUserBackupFileRequest(region_id=REGION))
    # A version the tarball's PG_VERSION contradicts, or no version at all.
    h.expect_error("InvalidParameter", 400, client.import_user_backup_file,
                   rds.ImportUserBackupFileRequest(backup_file=name, engine_version="16.0",
                                                   region_id=REGION))
    h.expect_error("InvalidEngineVersion.Malformed", 400, client.import_user_backup_file,
                   rds.ImportUserBackupFileRequest(backup_file=name, engine_version="8.0",
                                                   region_id=REGION))
    h.expect_error("InvalidRetention.Malformed", 400, client.import_user_backup_file,
                   rds.ImportUserBackupFileRequest(backup_file=name, retention=0, region_id=REGION))
    h.expect_error("InvalidMode.NotSupported", 400, client.import_user_backup_file,
                   rds.ImportUserBackupFileRequest(backup_file=name, mode="oss", region_id=REGION))
    assert [r.backup_id for r in records(client)] == before
    assert not os.path.exists("/tmp/pwned")


def test_unknown_ids_are_not_found(client):
    for bad in ("20991231000000000", "../x", "x" * 200):
        h.expect_error("InvalidBackupId.NotFound", 404, client.update_user_backup_file,
                       rds.UpdateUserBackupFileRequest(backup_id=bad, comment="x", region_id=REGION))
        h.expect_error("InvalidBackupId.NotFound", 404, client.delete_user_backup_file,
                       rds.DeleteUserBackupFileRequest(backup_id=bad, region_id=REGION))
        assert records(client, backup_id=bad) == []
    h.expect_error("MissingParameter", 400, client.delete_user_backup_file,
                   rds.DeleteUserBackupFileRequest(region_id=REGION))


def test_registered_instances_sets_are_not_user_backups(source, admin, client):
    instance_id = h.new_instance_id("ubreg")
    h.register(admin, instance_id)
    first = h.wait_first_backup(admin, instance_id)
    set_id = first["BackupId"]
    assert set_id
    h.expect_error("InvalidBackupId.NotFound", 404, client.delete_user_backup_file,
                   rds.DeleteUserBackupFileRequest(backup_id=set_id, region_id=REGION))
    assert records(client, backup_id=set_id) == []
    h.retire(admin, instance_id)
    # Nor can a registration take a user backup owner's name.
    body = None
    try:
        body = h.register(admin, "userbackup-20260101000000000")
    except Exception as e:  # the SDK raises for the refusal
        assert "user backups" in str(e), e
    assert body is None


def test_read_only_keys_only_list(source, ro_client, admin):
    name, _ = source
    backup_id = import_file(admin, name)
    wait_imported(admin, backup_id)
    assert [r.backup_id for r in records(ro_client, backup_id=backup_id)] == [backup_id]
    for fn, req in (
        (ro_client.import_user_backup_file,
         rds.ImportUserBackupFileRequest(backup_file=name, region_id=REGION)),
        (ro_client.update_user_backup_file,
         rds.UpdateUserBackupFileRequest(backup_id=backup_id, comment="x", region_id=REGION)),
        (ro_client.delete_user_backup_file,
         rds.DeleteUserBackupFileRequest(backup_id=backup_id, region_id=REGION)),
    ):
        h.expect_error("Forbidden.ReadOnlyAccessKey", 403, fn, req)
    r = records(admin, backup_id=backup_id)[0]
    assert r.status == "BackupSuccess" and not r.comment
    admin.delete_user_backup_file(rds.DeleteUserBackupFileRequest(backup_id=backup_id, region_id=REGION))
