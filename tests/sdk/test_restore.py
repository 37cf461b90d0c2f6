"""The restore family through the official SDK: clones by backup set and by
time (data compared with what was committed at that time), deletion of
clones only, databases and tables restored into the original without
touching anything else, signed downloads checked with PostgreSQL's own
pg_verifybackup and started with pg_ctl, WAL downloads compared byte for
byte, expired and altered links refused, restore drills recorded."""

import io
import os
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

PG_BIN = "/usr/lib/postgresql/15/bin"


def as_postgres(cmd, **kw):
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=120, **kw)


def psql_at(port, sql, db="postgres", host="127.0.0.1"):
    out = as_postgres([f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                       "-h", host, "-p", str(port), "-U", "postgres", "-d", db, "-c", sql])
    assert out.returncode == 0, f"psql on port {port} failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def psql_db(db, sql):
    return psql_at(h.pg_port(), sql, db=db, host=h.pg_host())


def attribute(client, instance_id):
    body = h.call(client, "DescribeDBInstanceAttribute", DBInstanceId=instance_id)
    return body["Items"]["DBInstanceAttribute"][0]


def wait_running(client, instance_id, timeout=180):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        a = attribute(client, instance_id)
        if not seen or seen[-1] != a["DBInstanceStatus"]:
            seen.append(a["DBInstanceStatus"])
        if a["DBInstanceStatus"] in ("Running", "Failed"):
            assert a["DBInstanceStatus"] == "Running", a
            return a, seen
        if time.monotonic() > deadline:
            pytest.fail(f"{instance_id} not running after {timeout}s: {seen}")
        time.sleep(0.5)


def wait_recoverable_past(client, instance_id, t, timeout=60):
    """Waits until point-in-time recovery reaches past `t`."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.describe_local_available_recovery_time(
            rds.DescribeLocalAvailableRecoveryTimeRequest(dbinstance_id=instance_id)
        ).body
        if body.recovery_end_time and h.parse_time(body.recovery_end_time) > t:
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"recovery window of {instance_id} never passed {t}: {body.to_map()}")
        time.sleep(0.5)


def committed_then_more(table, db="postgres"):
    """Commits 300 rows, notes a time T after them, commits 200 more; returns T."""
    psql_db(db, f"CREATE TABLE {table} (id int PRIMARY KEY, note text);"
                f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 300) g;")
    time.sleep(1.2)
    t = h.utcnow().replace(microsecond=0)
    time.sleep(1.2)
    psql_db(db, f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(301, 500) g;"
                "SELECT pg_switch_wal();")
    return t


def test_clone_by_time_and_by_backup_then_delete(instance, admin):
    client = h.make_client("v2", *h.admin_key())
    t = committed_then_more("clone_ledger")
    wait_recoverable_past(admin, instance.id, t)

    body = client.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t),
        pay_type="Postpaid", dbinstance_class="pg.n2.small.1", vpcid="vpc-ignored"))
    by_time = body.body.dbinstance_id
    assert by_time and by_time != instance.id
    a, seen = wait_running(client, by_time)
    assert seen[0] in ("Creating", "Running"), seen
    assert a["StrataCreatedByStrata"] is True and a["StrataSourceDBInstanceId"] == instance.id
    port = int(a["Port"])
    assert psql_at(port, "SELECT count(*), max(id) FROM clone_ledger") == "300|300"

    tasks = h.jobs(admin, instance.id)
    clone_tasks = [j for j in tasks if j["TaskAction"] == "CloneDBInstance"]
    assert clone_tasks and clone_tasks[0]["BackupStatus"] == "Finished", tasks
    assert clone_tasks[0]["Process"] == "100%"

    # By the registration's first backup: the ledger did not exist yet.
    first_backup = instance.first_job["BackupId"]
    by_backup = h.make_client("v3", *h.admin_key()).clone_dbinstance(
        rds.CloneDBInstanceRequest(dbinstance_id=instance.id, backup_id=first_backup)
    ).body.dbinstance_id
    a2, _ = wait_running(admin, by_backup)
    assert psql_at(int(a2["Port"]), "SELECT to_regclass('clone_ledger') IS NULL") == "t"

    # Only instances Strata created can be deleted.
    h.expect_error("IncorrectDBInstanceType", 403, client.delete_dbinstance,
                   rds.DeleteDBInstanceRequest(dbinstance_id=instance.id))
    for clone_id, clone_port in ((by_time, port), (by_backup, int(a2["Port"]))):
        admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone_id))
        h.expect_error("InvalidDBInstance.NotFound", 404, admin.describe_dbinstance_attribute,
                       rds.DescribeDBInstanceAttributeRequest(dbinstance_id=clone_id))
        out = as_postgres([f"{PG_BIN}/pg_isready", "-h", "127.0.0.1", "-p", str(clone_port)])
        assert out.returncode != 0, f"clone {clone_id} still answers on {clone_port}"
    # The original is untouched.
    assert psql_db("postgres", "SELECT count(*) FROM clone_ledger") == "500"


def test_clone_refuses_times_outside_the_window(instance, client):
    body = client.describe_local_available_recovery_time(
        rds.DescribeLocalAvailableRecoveryTimeRequest(dbinstance_id=instance.id)).body
    begin = h.parse_time(body.recovery_begin_time)
    h.expect_error("InvalidRestoreTime", 400, client.clone_dbinstance, rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(begin.replace(year=begin.year - 1))))
    h.expect_error("InvalidRestoreTime.Format", 400, client.clone_dbinstance,
                   rds.CloneDBInstanceRequest(dbinstance_id=instance.id, restore_time="yesterday"))
    h.expect_error("MissingParameter", 400, client.clone_dbinstance,
                   rds.CloneDBInstanceRequest(dbinstance_id=instance.id))
    h.expect_error("InvalidBackupSetID.NotFound", 404, client.clone_dbinstance,
                   rds.CloneDBInstanceRequest(dbinstance_id=instance.id, backup_id="123"))


def test_restore_database_and_table_into_the_original(instance, admin, sig):
    client = h.make_client(sig, *h.admin_key())
    db = f"rt_{sig}"
    for stmt in (f"DROP DATABASE IF EXISTS {db}", f"DROP DATABASE IF EXISTS {db}_restored",
                 f"CREATE DATABASE {db}"):
        psql_db("postgres", stmt)
    psql_db(db, "CREATE TABLE other (id int); INSERT INTO other VALUES (1), (2);")
    t = committed_then_more("t", db=db)
    psql_db(db, "INSERT INTO other VALUES (3); SELECT pg_switch_wal();")
    wait_recoverable_past(admin, instance.id, t)
    before = {x: psql_db(db, f"SELECT count(*), sum(id) FROM {x}") for x in ("t", "other")}

    meta = f'[{{"type":"db","name":"{db}","newname":"{db}_restored"}}]'
    client.restore_table(rds.RestoreTableRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t), table_meta=meta))
    job = [j for j in h.jobs(admin, instance.id) if j["TaskAction"] == "RestoreTable"][0]
    done = h.wait_job(admin, instance.id, job["BackupJobId"], timeout=180)
    assert done.backup_status == "Finished", h.jobs(admin, instance.id)
    assert psql_db(f"{db}_restored", "SELECT count(*), max(id) FROM t") == "300|300"
    assert psql_db(f"{db}_restored", "SELECT count(*) FROM other") == "2"

    table_meta = (f'[{{"type":"db","name":"{db}","tables":'
                  f'[{{"type":"table","name":"public.t","newname":"t_restored"}}]}}]')
    client.restore_table(rds.RestoreTableRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t), table_meta=table_meta))
    job = [j for j in h.jobs(admin, instance.id) if j["TaskAction"] == "RestoreTable"][0]
    done = h.wait_job(admin, instance.id, job["BackupJobId"], timeout=180)
    assert done.backup_status == "Finished", h.jobs(admin, instance.id)
    assert psql_db(db, "SELECT count(*), max(id) FROM t_restored") == "300|300"
    # The original's data is unchanged.
    after = {x: psql_db(db, f"SELECT count(*), sum(id) FROM {x}") for x in ("t", "other")}
    assert after == before

    h.expect_error("InvalidDBName.Duplicate", 400, client.restore_table, rds.RestoreTableRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t), table_meta=meta))
    h.expect_error("InvalidTableName.Duplicate", 400, client.restore_table, rds.RestoreTableRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t), table_meta=table_meta))
    h.expect_error("InvalidTableMeta.Malformed", 400, client.restore_table, rds.RestoreTableRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t), table_meta='[{"name":"x"}]'))
    h.expect_error("InvalidDBName.NotFound", 400, client.restore_table, rds.RestoreTableRequest(
        dbinstance_id=instance.id, restore_time=h.fmt_seconds(t),
        table_meta='[{"type":"db","name":"nope","tables":[{"type":"table","name":"t","newname":"t2"}]}]'))


def fetch(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def fetch_status(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_downloaded_backup_verifies_and_starts(instance, client):
    psql_db("postgres", "CREATE TABLE IF NOT EXISTS dl_ledger AS SELECT g AS id FROM generate_series(1, 777) g;")
    job = h.backup(client, instance.id)
    item = [b for b in h.describe_backups(client, instance.id).items.backup
            if b.backup_id == job.backup_id][0]
    url = item.backup_download_url
    assert url and item.backup_intranet_download_url == url
    assert "Expires=" in url and "Signature=" in url
    assert h.admin_key()[1] not in url and h.admin_key()[0] not in url

    archive = fetch(url)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        with tarfile.open(fileobj=io.BytesIO(archive)) as outer:
            names = outer.getnames()
            assert {"base.tar", "pg_wal.tar", "backup_manifest"} <= set(names), names
            outer.extractall(tmp)
        data = os.path.join(tmp, "data")
        os.makedirs(os.path.join(data, "pg_wal"))
        with tarfile.open(os.path.join(tmp, "base.tar")) as base:
            base.extractall(data)
        with tarfile.open(os.path.join(tmp, "pg_wal.tar")) as wal:
            wal.extractall(os.path.join(data, "pg_wal"))
        os.replace(os.path.join(tmp, "backup_manifest"), os.path.join(data, "backup_manifest"))
        subprocess.run(["chown", "-R", "postgres:postgres", tmp], check=True)
        os.chmod(data, 0o700)
        verify = as_postgres([f"{PG_BIN}/pg_verifybackup", data])
        assert verify.returncode == 0 and "successfully verified" in verify.stdout, verify
        port = _free_port()
        start = as_postgres([f"{PG_BIN}/pg_ctl", "-D", data, "-l", os.path.join(tmp, "log"), "-w",
                             "-o", f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={tmp}",
                             "start"])
        try:
            assert start.returncode == 0, (start.stderr, open(os.path.join(tmp, "log")).read())
            assert psql_at(port, "SELECT count(*), sum(id) FROM dl_ledger") == "777|302253"
        finally:
            as_postgres([f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "stop"])

    # zstd variant: same archive, compressed.
    raw = h.call(client, "DescribeBackups", DBInstanceId=instance.id, BackupId=job.backup_id)
    zst_url = raw["Items"]["Backup"][0]["StrataBackupDownloadURLZstd"]
    compressed = fetch(zst_url)
    assert compressed[:4] == b"\x28\xb5\x2f\xfd" and len(compressed) < len(archive)
    unpacked = subprocess.run(["zstd", "-dc"], input=compressed, capture_output=True)
    assert unpacked.returncode == 0 and unpacked.stdout == archive

    # Altered links are refused: another signature, another backup under the
    # same signature, an expiry moved into the past (expiry itself is checked
    # by the server's unit tests with a clock).
    status, body = fetch_status(url.replace("Signature=", "Signature=0"))
    assert status == 403 and b"Forbidden.DownloadLink" in body, body
    other = url.replace(f"/{job.backup_id}.tar", f"/{instance.first_job['BackupId']}.tar")
    assert fetch_status(other)[0] == 403
    moved = url.split("Expires=")[0] + "Expires=1&" + url.split("&", 1)[1]
    assert fetch_status(moved)[0] == 403


def test_wal_download_is_the_original_segment(instance, client):
    # Keep switched segments on the server so their bytes can be compared.
    h.psql("ALTER SYSTEM SET wal_keep_size = '1GB'")
    h.psql("SELECT pg_reload_conf()")
    name = h.write_and_switch_wal("wal_dl")
    deadline = time.monotonic() + 60
    while True:
        files = client.describe_binlog_files(rds.DescribeBinlogFilesRequest(
            dbinstance_id=instance.id, start_time="2000-01-01T00:00:00Z",
            end_time="2100-01-01T00:00:00Z", page_size=100)).body.items.bin_log_file
        match = [f for f in files if f.log_file_name == name]
        if match:
            break
        assert time.monotonic() < deadline, [f.log_file_name for f in files]
        time.sleep(0.5)
    f = match[0]
    assert f.download_link and f.intranet_download_link == f.download_link
    assert h.parse_time(f.link_expired_time) > h.utcnow()
    data = fetch(f.download_link)
    assert len(data) == f.file_size == h.SEGMENT_SIZE
    data_dir = h.psql("SHOW data_directory")
    with open(os.path.join(data_dir, "pg_wal", name), "rb") as on_server:
        assert on_server.read() == data
    # A WAL segment starts with its page header magic and names its timeline.
    assert int.from_bytes(data[4:8], "little") == int(name[:8], 16)
    assert fetch_status(f.download_link.replace("Signature=", "Signature=f"))[0] == 403


def test_restore_drills_record_their_outcome(instance, admin):
    job = h.backup(admin, instance.id)
    deadline = time.monotonic() + 180
    while True:
        raw = h.call(admin, "DescribeBackups", DBInstanceId=instance.id, BackupId=job.backup_id)
        item = raw["Items"]["Backup"][0]
        if item.get("StrataDrillStatus") in ("Passed", "Failed"):
            break
        assert time.monotonic() < deadline, item
        time.sleep(1)
    assert item["StrataDrillStatus"] == "Passed", item
    assert "pg_amcheck clean" in item["StrataDrillMessage"], item
    assert item["IsAvail"] == 1
    h.parse_time(item["StrataDrillTime"])
    status, ctype, metrics = h.http_get("/metrics")
    assert status == 200
    line = [l for l in metrics.splitlines() if l.startswith(f'strata_drill_failed{{instance="{instance.id}"}}')]
    assert line and line[0].endswith(" 0"), line
    # On demand too: the drill runs again and passes again.
    started = h.call(admin, "StrataStartRestoreDrill", DBInstanceId=instance.id, BackupId=job.backup_id)
    assert started["StrataJobId"].isdigit()
    first_time = item["StrataDrillTime"]
    deadline = time.monotonic() + 180
    while True:
        item = h.call(admin, "DescribeBackups", DBInstanceId=instance.id,
                      BackupId=job.backup_id)["Items"]["Backup"][0]
        if item.get("StrataDrillStatus") in ("Passed", "Failed") and item["StrataDrillTime"] != first_time:
            break
        assert time.monotonic() < deadline, item
        time.sleep(1)
    assert item["StrataDrillStatus"] == "Passed", item


def _free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
