"""Shared helpers for Strata's API tests.

Every signed call goes through the official Alibaba Cloud SDK
(`alibabacloud_rds20140815` on `alibabacloud_tea_openapi`); the hand-made
signers at the bottom exist only to build requests the SDK cannot send
(tampered, expired, replayed, unsigned) and are checked against the server
with a valid request first, so a refusal means what the test says.

The Rust harness (crates/strata/tests/api.rs) starts the server and sets:
STRATA_ENDPOINT (host:port), STRATA_KEY_ID/STRATA_KEY_SECRET (admin key),
STRATA_RO_KEY_ID/STRATA_RO_KEY_SECRET (read-only key) and
STRATA_PG_HOST/STRATA_PG_PORT/STRATA_PG_USER (a PostgreSQL 15 server with
trust authentication that tests register as instances).
"""

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import uuid

import pytest
from alibabacloud_rds20140815 import models as rds
from alibabacloud_rds20140815.client import Client
from alibabacloud_tea_openapi.exceptions import ClientException
from alibabacloud_tea_openapi.models import Config
from alibabacloud_tea_openapi.utils_models import OpenApiRequest, Params
from darabonba.runtime import RuntimeOptions

API_VERSION = "2014-08-15"
SIGNATURES = ["v3", "v2"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEGMENT_SIZE = 16 * 1024 * 1024
JOB_TIMEOUT = 120
IN_PROGRESS = ("Preparing", "Waiting", "Uploading", "Checking")


def env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"environment variable {name} is not set: run these tests through "
            "`cargo test -p strata --test api`, which starts the server and sets it"
        )
    return value


def endpoint():
    return env("STRATA_ENDPOINT")


def admin_key():
    return env("STRATA_KEY_ID"), env("STRATA_KEY_SECRET")


def read_only_key():
    return env("STRATA_RO_KEY_ID"), env("STRATA_RO_KEY_SECRET")


# ----- SDK clients -----


def make_client(sig, key_id, secret, read_timeout_ms=60000):
    """An SDK client signing with V3 ACS3-HMAC-SHA256 (`v3`, the SDK's
    default) or V2 HMAC-SHA1 (`v2`)."""
    config = Config(
        endpoint=endpoint(),
        protocol="http",
        access_key_id=key_id,
        access_key_secret=secret,
        read_timeout=read_timeout_ms,
        connect_timeout=5000,
    )
    if sig == "v2":
        config.signature_algorithm = "v2"
    else:
        assert sig == "v3", sig
    return Client(config)


def call(client, action, **query):
    """Any action through the SDK's generic `call_api`; returns the raw JSON
    body (extension fields included, which the typed models drop)."""
    params = Params(
        action=action,
        version=API_VERSION,
        protocol="HTTP",
        pathname="/",
        method="POST",
        auth_type="AK",
        style="RPC",
        req_body_type="formData",
        body_type="json",
    )
    query = {k: str(v) for k, v in query.items() if v is not None}
    resp = client.call_api(params, OpenApiRequest(query=query), RuntimeOptions())
    assert resp["statusCode"] == 200, resp
    return resp["body"]


def expect_error(code, status, fn, *args, **kwargs):
    """Runs an SDK call that must fail with `code` and HTTP `status`."""
    with pytest.raises(ClientException) as info:
        fn(*args, **kwargs)
    e = info.value
    assert (e.code, e.status_code) == (code, status), f"{e.code} {e.status_code}: {e.message}"
    assert e.data.get("RequestId") and e.data.get("HostId") and e.data.get("Message"), e.data
    return e


# ----- instances and jobs -----


def pg_host():
    return env("STRATA_PG_HOST")


def pg_port():
    return int(env("STRATA_PG_PORT"))


def new_instance_id(prefix):
    return f"sdk-{prefix}-{uuid.uuid4().hex[:8]}"


def register(client, instance_id, **overrides):
    query = {
        "DBInstanceId": instance_id,
        "Host": pg_host(),
        "Port": pg_port(),
        "User": env("STRATA_PG_USER"),
        "SSLMode": "disable",
    }
    query.update(overrides)
    return call(client, "StrataRegisterDBInstance", **query)


def jobs(client, instance_id, **filters):
    """Backup jobs as raw JSON (with the Strata* extension fields)."""
    body = call(client, "DescribeBackupTasks", DBInstanceId=instance_id, **filters)
    return body["Items"]["BackupJob"]


def wait_job(client, instance_id, job_id, timeout=JOB_TIMEOUT):
    """Polls DescribeBackupTasks until the job is Finished or Failed; returns
    the typed SDK item."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        resp = client.describe_backup_tasks(
            rds.DescribeBackupTasksRequest(dbinstance_id=instance_id, backup_job_id=str(job_id))
        )
        items = resp.body.items.backup_job
        assert len(items) == 1, [i.to_map() for i in items]
        job = items[0]
        assert job.backup_job_id == str(job_id)
        assert job.backup_status in (
            "NoStart", "Preparing", "Waiting", "Uploading", "Checking", "Finished", "Failed"
        ), job.to_map()
        if not seen or seen[-1] != job.backup_status:
            seen.append(job.backup_status)
        if job.backup_status in ("Finished", "Failed"):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"backup job {job_id} not done after {timeout}s: states {seen}")
        time.sleep(0.2)


def wait_idle(client, instance_id, timeout=JOB_TIMEOUT):
    """Waits until no backup job of the instance is in progress; returns the
    jobs (raw JSON, newest first)."""
    deadline = time.monotonic() + timeout
    while True:
        all_jobs = jobs(client, instance_id)
        if all(j["BackupStatus"] in ("Finished", "Failed") for j in all_jobs):
            return all_jobs
        if time.monotonic() > deadline:
            pytest.fail(f"backups of {instance_id} still running after {timeout}s: {all_jobs}")
        time.sleep(0.2)


def wait_first_backup(client, instance_id, timeout=JOB_TIMEOUT):
    """The automatic first backup a registration starts: waits for it to
    finish and returns its job (raw JSON)."""
    deadline = time.monotonic() + timeout
    while True:
        found = jobs(client, instance_id)
        if found and all(j["BackupStatus"] in ("Finished", "Failed") for j in found):
            assert len(found) == 1, found
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no finished first backup for {instance_id} after {timeout}s: {found}")
        time.sleep(0.2)


def backup(client, instance_id):
    """A manual backup through CreateBackup; returns the finished job."""
    resp = client.create_backup(
        rds.CreateBackupRequest(dbinstance_id=instance_id, backup_method="Physical")
    )
    assert resp.status_code == 200
    job_id = resp.body.backup_job_id
    assert job_id and job_id.isdigit(), resp.body.to_map()
    job = wait_job(client, instance_id, job_id)
    assert job.backup_status == "Finished", jobs(client, instance_id, BackupJobId=job_id)
    assert job.backup_id, job.to_map()
    return job


def describe_backups(client, instance_id, **kw):
    return client.describe_backups(
        rds.DescribeBackupsRequest(dbinstance_id=instance_id, **kw)
    ).body


def deregister(client, instance_id):
    wait_idle(client, instance_id)
    body = call(client, "StrataDeregisterDBInstance", DBInstanceId=instance_id)
    assert body["DBInstanceId"] == instance_id


def retire(client, instance_id):
    """Deregisters after turning log backup off. Deregistering an instance
    whose WAL receiver runs races the scheduler, which may start the
    receiver again (see test_backups.test_deregistration_leaves_no_replication_slot);
    with log backup off the scheduler leaves the instance's WAL alone."""
    client.modify_backup_policy(
        rds.ModifyBackupPolicyRequest(
            dbinstance_id=instance_id, backup_policy_mode="LogBackupPolicy", enable_backup_log="False"
        )
    )
    deregister(client, instance_id)


# ----- times -----


def utcnow():
    return dt.datetime.now(dt.timezone.utc)


def fmt_minutes(t):
    return t.strftime("%Y-%m-%dT%H:%MZ")


def fmt_seconds(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s):
    for f in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%MZ"):
        try:
            return dt.datetime.strptime(s, f).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            pass
    raise AssertionError(f"not an RDS UTC time: {s!r}")


def next_window(days, start_hour, start_minute, now):
    """The first window start on one of `days` at or after `now`: what
    PreferredNextBackupTime must be."""
    for offset in range(0, 9):
        day = (now + dt.timedelta(days=offset)).date()
        if WEEKDAYS[day.weekday()] in days:
            start = dt.datetime(
                day.year, day.month, day.day, start_hour, start_minute, tzinfo=dt.timezone.utc
            )
            if start >= now:
                return start
    raise AssertionError("no window within 8 days")


# ----- the PostgreSQL server -----


def psql(sql):
    """Runs SQL on the test's PostgreSQL server as superuser `postgres` (as
    the `postgres` OS user when we are root); returns trimmed stdout."""
    binary = "/usr/lib/postgresql/15/bin/psql"
    if not os.path.exists(binary):
        binary = shutil.which("psql") or binary
    cmd = [
        binary, "-X", "-At", "-v", "ON_ERROR_STOP=1",
        "-h", pg_host(), "-p", str(pg_port()), "-U", "postgres", "-d", "postgres", "-c", sql,
    ]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=60)
    assert out.returncode == 0, f"psql failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def write_and_switch_wal(table):
    """Commits a few rows, then switches WAL; returns the name of the segment
    the switch completed."""
    psql(
        f"CREATE TABLE IF NOT EXISTS {table} (id serial PRIMARY KEY, note text);"
        f"INSERT INTO {table} (note) SELECT md5(g::text) FROM generate_series(1, 500) g;"
    )
    name = psql("SELECT pg_walfile_name(pg_switch_wal())")
    assert len(name) == 24, name
    return name


# ----- hand-made requests (negative auth cases only) -----


def _enc(s):
    """RFC 3986 percent-encoding, as both signature versions use it."""
    return urllib.parse.quote(str(s), safe="-_.~")


def canonical_query(params):
    return "&".join(f"{_enc(k)}={_enc(v)}" for k, v in sorted(params.items()))


def sign_v3(action, params, key_id, secret, when=None, nonce=None, host=None):
    """A V3 ACS3-HMAC-SHA256 request (POST /, parameters in the query
    string, empty body). Returns (method, path_and_query, headers, body)."""
    when = when or utcnow()
    host = host or endpoint()
    body = b""
    headers = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": API_VERSION,
        "x-acs-date": fmt_seconds(when),
        "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
    }
    signed = sorted(headers)
    query = canonical_query(params)
    canonical = "\n".join(
        [
            "POST",
            "/",
            query,
            "".join(f"{h}:{headers[h].strip()}\n" for h in signed),
            ";".join(signed),
            headers["x-acs-content-sha256"],
        ]
    )
    to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
    signature = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"ACS3-HMAC-SHA256 Credential={key_id},SignedHeaders={';'.join(signed)},Signature={signature}"
    )
    return "POST", "/?" + query, headers, body


def sign_v2(action, params, key_id, secret, when=None, nonce=None, host=None):
    """A V2 HMAC-SHA1 request (POST /, everything in the query string).
    Returns (method, path_and_query, headers, body)."""
    when = when or utcnow()
    all_params = dict(params)
    all_params.update(
        {
            "Action": action,
            "Version": API_VERSION,
            "Format": "JSON",
            "AccessKeyId": key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": nonce or uuid.uuid4().hex,
            "Timestamp": fmt_seconds(when),
        }
    )
    to_sign = "POST&%2F&" + _enc(canonical_query(all_params))
    digest = hmac.new((secret + "&").encode(), to_sign.encode(), hashlib.sha1).digest()
    all_params["Signature"] = base64.b64encode(digest).decode()
    return "POST", "/?" + canonical_query(all_params), {"host": host or endpoint()}, b""


def sign(sig, action, params, key_id, secret, **kw):
    return (sign_v3 if sig == "v3" else sign_v2)(action, params, key_id, secret, **kw)


def send(request):
    """Sends a prepared request as is; returns (status, parsed JSON body)."""
    method, target, headers, body = request
    host, port = endpoint().rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise AssertionError(f"HTTP {resp.status}: not JSON: {raw[:500]!r}")
    return resp.status, parsed


def http_get(path):
    host, port = endpoint().rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read().decode()
    finally:
        conn.close()
