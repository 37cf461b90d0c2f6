"""What a registered server's superuser, or an API caller with a valid key,
can make Strata do with names and settings — tried as an attacker would,
through the official SDK against the real server:

- database and table names that libpq would read as connection settings
  (`host=… port=…`, `dbname=postgres`, `postgresql://…`) are restored under
  exactly that name, and no connection (nor the stored password) ever goes
  to the host they name; the same for a restore drill of a source database
  with such a name;
- quotes, `;`, leading `-`, multibyte and 63-byte names are data; newline,
  NUL and 64-byte names are refused up front with a clear code;
- settings of the source that run commands or load libraries
  (`recovery_end_command`, `archive_cleanup_command`,
  `shared_preload_libraries`) never run or load on Strata's host, in a drill
  or in a clone, and the clone's task says what was removed;
- a scratch server's socket directory is closed to other OS users;
- a table restore that fails after its data was loaded leaves nothing
  behind, and the retry succeeds.
"""

import glob
import os
import socket
import stat
import struct
import subprocess
import threading
import time
import uuid

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

PG_BIN = "/usr/lib/postgresql/15/bin"
PASSWORD = "canary-" + uuid.uuid4().hex


def psql_in(db, sql, port=None, host=None):
    cmd = [f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
           "-h", host or h.pg_host(), "-p", str(port or h.pg_port()), "-U", "postgres",
           "--dbname=dbname=" + conninfo_value(db), "-c", sql]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=60)
    assert out.returncode == 0, f"psql in {db!r} failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def conninfo_value(v):
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_ident(name):
    return '"' + name.replace('"', '""') + '"'


def sql_lit(name):
    return "'" + name.replace("'", "''") + "'"


def databases():
    return set(h.psql("SELECT datname FROM pg_database").splitlines())


class Trap:
    """A TCP listener that speaks just enough of PostgreSQL's protocol to
    ask a client for its password in clear text, and records every
    connection and every password it was sent."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.passwords = []
        self.stopping = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            try:
                self.handle(conn)
            except OSError:
                pass
            finally:
                conn.close()

    @staticmethod
    def read_exact(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def handle(self, conn):
        conn.settimeout(5)
        while True:
            length, code = struct.unpack("!ii", self.read_exact(conn, 8))
            self.read_exact(conn, length - 8)
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                conn.sendall(b"N")
                continue
            break
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind = self.read_exact(conn, 1)
        (length,) = struct.unpack("!i", self.read_exact(conn, 4))
        body = self.read_exact(conn, length - 4)
        if kind == b"p":
            self.passwords.append(body.rstrip(b"\0").decode(errors="replace"))

    def close(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def trap():
    t = Trap()
    yield t
    t.close()


@pytest.fixture(scope="module")
def instance(admin):
    """The test server registered with a stored password (the server itself
    trusts loopback, so the password is only there to be stolen)."""
    instance_id = h.new_instance_id("hostile")
    h.register(admin, instance_id, Password=PASSWORD)
    first = h.wait_first_backup(admin, instance_id)
    hour = (h.utcnow().hour + 12) % 24
    admin.modify_backup_policy(rds.ModifyBackupPolicyRequest(
        dbinstance_id=instance_id,
        preferred_backup_time=f"{hour:02d}:00Z-{(hour + 1) % 24:02d}:00Z"))

    class I:
        id = instance_id
        first_job = first
    yield I
    h.retire(admin, instance_id)


def restore_table(admin, instance_id, meta, backup_id):
    admin.restore_table(rds.RestoreTableRequest(
        dbinstance_id=instance_id, backup_id=backup_id, table_meta=meta))
    job = [j for j in h.jobs(admin, instance_id) if j["TaskAction"] == "RestoreTable"][0]
    done = h.wait_job(admin, instance_id, job["BackupJobId"], timeout=180)
    return done, [j for j in h.jobs(admin, instance_id)
                  if j["BackupJobId"] == job["BackupJobId"]][0]


def drill(admin, instance_id, backup_id):
    """Runs a restore drill of a backup set; returns its DescribeBackups item."""
    h.call(admin, "StrataStartRestoreDrill", DBInstanceId=instance_id, BackupId=backup_id)
    deadline = time.monotonic() + 180
    while True:
        item = h.call(admin, "DescribeBackups", DBInstanceId=instance_id,
                      BackupId=backup_id)["Items"]["Backup"][0]
        if item.get("StrataDrillStatus") in ("Passed", "Failed"):
            return item
        assert time.monotonic() < deadline, item
        time.sleep(0.5)


def test_names_that_look_like_connection_strings_are_names(instance, admin, trap):
    src = "hs_src"
    for db in (src,):
        h.psql(f"DROP DATABASE IF EXISTS {db}")
        h.psql(f"CREATE DATABASE {db}")
    psql_in(src, "CREATE TABLE t (id int PRIMARY KEY, note text);"
                 "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 120) g;")
    backup_id = h.backup(admin, instance.id).backup_id
    hostile = [
        f"host=127.0.0.1 port={trap.port} user=leak",
        "dbname=postgres",
        f"postgresql://leak@127.0.0.1:{trap.port}/x",
        "it's \"quoted\"; DROP DATABASE postgres; --",
        "-d postgres",
        "données-日本語",
        "n" * 63,
    ]
    before_postgres = h.psql("SELECT count(*) FROM pg_class WHERE relname = 't'")
    for name in hostile:
        meta = f'[{{"type":"db","name":"{src}","newname":{json_str(name)}}}]'
        done, job = restore_table(admin, instance.id, meta, backup_id)
        assert done.backup_status == "Finished", job
        assert name in databases(), (name, databases())
        assert psql_in(name, "SELECT count(*), max(id) FROM t") == "120|120", name
    # Nothing went into `postgres`, nothing reached the trap.
    assert h.psql("SELECT count(*) FROM pg_class WHERE relname = 't'") == before_postgres
    assert trap.connections == 0 and trap.passwords == [], (trap.connections, trap.passwords)
    assert not any(d.startswith("strata_restore_") for d in databases())

    # Tables: a 63-byte new name (its index names are derived and cut to fit)
    # and names with quotes, into a database whose name is a conninfo string.
    into = hostile[0]
    for newname in ("t" * 63, "we'ird \"t\"; x", "-t"):
        meta = (f'[{{"type":"db","name":"{src}","newname":{json_str(into)},"tables":'
                f'[{{"type":"table","name":"public.t","newname":{json_str(newname)}}}]}}]')
        done, job = restore_table(admin, instance.id, meta, backup_id)
        assert done.backup_status == "Finished", job
        assert psql_in(into, f"SELECT count(*) FROM public.{sql_ident(newname)}") == "120"
        assert psql_in(into, "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                             f"WHERE c.relname = {sql_lit(newname)} AND i.indisprimary") == "1"
    assert trap.connections == 0

    for name in hostile:
        h.psql(f"DROP DATABASE {sql_ident(name)}")


def json_str(s):
    import json
    return json.dumps(s)


@pytest.mark.parametrize("newname,code", [
    ("a\nb", "InvalidDBName.Format"),
    ("a\u0000b", "InvalidDBName.Format"),
    ("x" * 64, "InvalidDBName.Format"),
    ("é" * 32, "InvalidDBName.Format"),
])
def test_unusable_names_are_refused_up_front(instance, admin, newname, code):
    meta = f'[{{"type":"db","name":"postgres","newname":{json_str(newname)}}}]'
    e = h.expect_error(code, 400, admin.restore_table, rds.RestoreTableRequest(
        dbinstance_id=instance.id, backup_id=instance.first_job["BackupId"], table_meta=meta))
    assert "\n" not in e.message and "\r" not in e.message, e.message
    meta = ('[{"type":"db","name":"postgres","tables":[{"type":"table","name":"public.t",'
            f'"newname":{json_str(newname)}}}]}}]')
    h.expect_error(code.replace("DBName", "TableName"), 400, admin.restore_table,
                   rds.RestoreTableRequest(dbinstance_id=instance.id,
                                           backup_id=instance.first_job["BackupId"],
                                           table_meta=meta))


def test_a_drill_of_a_database_named_like_a_conninfo_stays_home(instance, admin, trap):
    name = f"host=127.0.0.1 port={trap.port} user=x dbname=y"
    # A name with a line break and quotes: listed, connected to and checked
    # like any other (names travel hex-encoded, connections as quoted values).
    odd = 'line\nbreak "q" \'; --'
    for db in (name, odd):
        h.psql(f"DROP DATABASE IF EXISTS {sql_ident(db)}")
        h.psql(f"CREATE DATABASE {sql_ident(db)}")
    psql_in(name, "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2);")
    backup_id = h.backup(admin, instance.id).backup_id
    item = drill(admin, instance.id, backup_id)
    assert item["StrataDrillStatus"] == "Passed", item
    dbs = h.psql("SELECT count(*) FROM pg_database WHERE datallowconn")
    assert f"pg_amcheck clean over {dbs} databases" in item["StrataDrillMessage"], (dbs, item)
    assert trap.connections == 0 and trap.passwords == []
    for db in (name, odd):
        h.psql(f"DROP DATABASE {sql_ident(db)}")


def scratch_dirs():
    return glob.glob(os.path.join(h.env("STRATA_DATA_DIR"), "instances", "scratch-*"))


def test_a_drill_checks_with_a_fresh_amcheck_not_the_sources(instance, admin):
    """The source's superuser replaces amcheck's functions with SQL of their own: a drill
    runs pg_amcheck as superuser of its scratch server, so it must check with amcheck
    created afresh from the scratch server's installation, never with the backup's."""
    marker = f"/tmp/strata-amcheck-{uuid.uuid4().hex}"
    body = f"BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {marker}'''; END"
    h.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
    try:
        h.psql(
            "CREATE OR REPLACE FUNCTION bt_index_check(index regclass, heapallindexed boolean) "
            f"RETURNS void LANGUAGE plpgsql AS $x${body}$x$")
        backup_id = h.backup(admin, instance.id).backup_id
    finally:
        h.psql("DROP EXTENSION IF EXISTS amcheck CASCADE")
    item = drill(admin, instance.id, backup_id)
    assert item["StrataDrillStatus"] == "Passed", item
    assert not os.path.exists(marker), "the backup's replaced amcheck function ran"


def test_source_commands_never_run_on_the_strata_host(instance, admin):
    marker = f"/tmp/strata-pwned-{uuid.uuid4().hex}"
    # Written byte for byte, as a superuser can (lo_export), with a byte
    # that is not UTF-8: the file must be filtered all the same.
    settings = {
        "recovery_end_command": f"touch {marker}-recovery-end",
        "archive_cleanup_command": f"touch {marker}-cleanup",
        "shared_preload_libraries": "strata_missing_library",
        "ssl_passphrase_command": "touch /tmp/never",
        "plperl.on_init": "system('touch /tmp/never')",
    }
    conf = b"# \xff\xfe not UTF-8 \xe9\n" + "".join(
        f"{k} = '{v.replace(chr(39), chr(39) * 2)}'\n" for k, v in settings.items()).encode()
    oid = h.psql(f"SELECT lo_from_bytea(0, decode('{conf.hex()}', 'hex'))")
    h.psql(f"SELECT lo_export({oid}, current_setting('data_directory') || '/postgresql.auto.conf')")
    h.psql(f"SELECT lo_unlink({oid})")
    try:
        backup_id = h.backup(admin, instance.id).backup_id
    finally:
        h.psql("ALTER SYSTEM RESET ALL")

    # A drill, watched while its scratch server runs: private directory, no
    # TCP listener.
    seen = {}

    def watch():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "conf" not in seen:
            for d in scratch_dirs():
                try:
                    st = os.stat(d)
                    socket_mode = stat.S_IMODE(os.stat(os.path.join(d, "socket")).st_mode)
                    conf = open(os.path.join(d, "pgdata", "postgresql.conf")).read()
                except OSError:
                    continue
                if "written by strata" in conf.lower():
                    seen.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                                socket_mode=socket_mode, conf=conf)
                    break
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    item = drill(admin, instance.id, backup_id)
    watcher.join()
    assert item["StrataDrillStatus"] == "Passed", item
    assert not glob.glob(marker + "*"), glob.glob(marker + "*")
    # The instance directory is Strata's (nobody else can swap what it
    # holds), the socket's directory is the server's alone, no TCP.
    assert "conf" in seen, "no scratch server was seen under STRATA_DATA_DIR"
    assert seen["uid"] == os.geteuid() and seen["mode"] & 0o022 == 0, seen
    assert seen["socket_mode"] == 0o700, seen
    assert "listen_addresses = ''" in seen["conf"], seen["conf"]
    assert "recovery_end_command" not in seen["conf"]

    # A clone keeps the source's settings except those, and says so.
    clone = admin.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, backup_id=backup_id)).body.dbinstance_id
    deadline = time.monotonic() + 180
    while True:
        a = h.call(admin, "DescribeDBInstanceAttribute",
                   DBInstanceId=clone)["Items"]["DBInstanceAttribute"][0]
        if a["DBInstanceStatus"] in ("Running", "Failed"):
            break
        assert time.monotonic() < deadline, a
        time.sleep(0.5)
    assert a["DBInstanceStatus"] == "Running", a
    assert not glob.glob(marker + "*")
    task = [j for j in h.jobs(admin, instance.id) if j["TaskAction"] == "CloneDBInstance"][0]
    for setting in settings:
        assert setting in task["StrataDetail"], task
    assert psql_in("postgres", "SHOW shared_preload_libraries", port=int(a["Port"]),
                   host="127.0.0.1") == ""
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone))


def test_a_failed_table_restore_leaves_nothing_and_can_be_retried(instance, admin):
    src, into = "hs_fn_src", "hs_fn_into"
    for db in (src, into):
        h.psql(f"DROP DATABASE IF EXISTS {db}")
        h.psql(f"CREATE DATABASE {db}")
    # The index needs a function the target database lacks: loading fails
    # after the table and its rows are in.
    psql_in(src, "CREATE FUNCTION twice(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2';"
                 "CREATE TABLE t (id int PRIMARY KEY, note text);"
                 "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200) g;"
                 "CREATE INDEX t_twice ON t (public.twice(id));")
    backup_id = h.backup(admin, instance.id).backup_id
    meta = (f'[{{"type":"db","name":"{src}","newname":"{into}","tables":'
            '[{"type":"table","name":"public.t","newname":"t_back"}]}]')
    done, job = restore_table(admin, instance.id, meta, backup_id)
    assert done.backup_status == "Failed", job
    assert "twice" in job.get("StrataErrorMessage", ""), job
    left = psql_in(into, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                         "WHERE n.nspname = 'public'")
    assert left == "0", psql_in(into, "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace")

    psql_in(into, "CREATE FUNCTION twice(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2'")
    done, job = restore_table(admin, instance.id, meta, backup_id)
    assert done.backup_status == "Finished", job
    assert psql_in(into, "SELECT count(*), max(id) FROM t_back") == "200|200"
    assert psql_in(into, "SELECT count(*) FROM pg_class WHERE relname LIKE 'strata_restore_%'") == "0"
    for db in (src, into):
        h.psql(f"DROP DATABASE {db}")
