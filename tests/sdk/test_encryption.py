"""Per-instance backup encryption with a KMS (moto's, started by the Rust
test) through the official SDK, V3 and V2: a CMK enabled on an instance, an
encrypted backup restored and compared, no plaintext of rows written after
enabling anywhere in the repository, a disabled key refusing new backups and
restores until it is enabled again, rotation re-wrapping the key without
touching a pack, hostile key ids refused with RDS-style codes."""

import json
import os
import subprocess
import time
import urllib.request

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h
from test_restore import psql_at, wait_running

KEEP_DEFAULT_POLICY = False


def kms(op, **body):
    """One call to the KMS (moto does not check signatures)."""
    req = urllib.request.Request(
        os.environ["STRATA_KMS_ENDPOINT"], data=json.dumps(body).encode(), method="POST",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{op}",
            "Authorization": "AWS4-HMAC-SHA256 Credential=STRATAMOTOACCESS/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0",
        })
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def cmk():
    meta = kms("CreateKey", Description="strata backups", KeyUsage="ENCRYPT_DECRYPT",
               Origin="AWS_KMS")["KeyMetadata"]
    assert meta["KeyUsage"] == "ENCRYPT_DECRYPT" and meta["Origin"] == "AWS_KMS", meta
    return meta


def repo_dir():
    return os.path.join(os.environ["STRATA_DATA_DIR"], "repo")


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def readable(data, needle):
    """Whether `needle` is in `data` as stored or in any zstd frame in it
    (objects of a plain repository are compressed, not hidden)."""
    if needle in data:
        return True
    at = data.find(ZSTD_MAGIC)
    while at >= 0:
        out = subprocess.run(["zstd", "-dcq"], input=data[at:], capture_output=True, timeout=60)
        if needle in out.stdout:
            return True
        at = data.find(ZSTD_MAGIC, at + 4)
    return False


def repo_contains(marker, since_ns=0, under=""):
    """The first repository object (under `under`, written after `since_ns`)
    that holds `marker`, or None."""
    needle = marker.encode()
    for root, _, files in os.walk(os.path.join(repo_dir(), under)):
        for f in files:
            path = os.path.join(root, f)
            if os.stat(path).st_mtime_ns < since_ns:
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            if readable(data, needle):
                return f"{path} ({data[:16]!r})"
    return None


def packs():
    out = {}
    for root, _, files in os.walk(os.path.join(repo_dir(), "packs")):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[f] = (st.st_size, st.st_mtime_ns)
    return out


def key_record(instance_id):
    with open(os.path.join(repo_dir(), "instances", instance_id, "encryption-key.json")) as f:
        return json.load(f)


def test_region_support_and_authorization(client):
    body = h.call(client, "CheckRegionSupportBackupEncryption", RegionId="cn-hangzhou")
    assert body["SupportBackupEncryption"] is True
    assert h.call(client, "CheckBackupEncryptionAuthorized", RegionId="cn-hangzhou")["AuthorizationState"] == "1"
    body = h.call(client, "AuthorizeBackupEncryption", RegionId="cn-hangzhou")
    assert body["AuthorizationState"] == 1 and "accepted" in body["Message"]


def test_hostile_and_unknown_keys_are_refused(client, instance):
    enable = lambda key: client.enable_backup_encryption(  # noqa: E731
        rds.EnableBackupEncryptionRequest(dbinstance_name=instance.id, encryption_key=key))
    for bad in ['key"; DROP', "key\nInjected: 1", "k" * 10240, "alias/with space"]:
        e = h.expect_error("InvalidEncryptionKey.Malformed", 400, enable, bad)
        assert "\n" not in e.message and len(e.message) < 1100
    h.expect_error("InvalidKmsKey.NotFound", 404, enable, "11111111-2222-3333-4444-555555555555")
    h.expect_error("MissingParameter", 400, client.enable_backup_encryption,
                   rds.EnableBackupEncryptionRequest(dbinstance_name=instance.id))
    h.expect_error("InvalidDBInstance.NotFound", 404, client.enable_backup_encryption,
                   rds.EnableBackupEncryptionRequest(dbinstance_name="no-such-db", encryption_key="x"))
    # Nothing was switched on by the refusals.
    h.expect_error("InvalidEncryptionKey.NotFound", 404, client.describe_dbinstance_encryption_key,
                   rds.DescribeDBInstanceEncryptionKeyRequest(dbinstance_id=instance.id))


def test_encrypted_backups_disable_rotate_and_restore(instance, admin, cmk):
    first_set = instance.first_job["BackupId"]
    # Before: WAL of a plain instance holds its rows as written (the check can fail).
    before = "STRATA-PLAIN-" + os.urandom(8).hex()
    h.psql(f"CREATE TABLE enc_before (note text); INSERT INTO enc_before VALUES ('{before}');"
           "SELECT pg_switch_wal();")
    deadline = time.monotonic() + 60
    while not repo_contains(before, since_ns=time.time_ns() - 5 * 10**9):
        assert time.monotonic() < deadline, "plain WAL never showed the row"
        time.sleep(0.5)

    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        body = client.enable_backup_encryption(rds.EnableBackupEncryptionRequest(
            dbinstance_name=instance.id, encryption_key=cmk["KeyId"])).body
        assert body.dbinstance_id == instance.id  # the same key again changes nothing
    record = key_record(instance.id)
    assert record["kms_key_id"] == cmk["Arn"] and record["key_version"] == 1
    assert "wrapped_key" in record and "plaintext" not in json.dumps(record).lower()

    secret = "STRATA-SECRET-" + os.urandom(8).hex()
    h.psql(f"CREATE TABLE enc_after (note text); INSERT INTO enc_after VALUES ('{secret}');"
           "SELECT pg_switch_wal();")
    encrypted_set = h.backup(admin, instance.id).backup_id
    h.psql("SELECT pg_switch_wal();")
    time.sleep(2)
    assert repo_contains(secret) is None, "a row written after enabling is readable in the repository"
    assert repo_contains(before, since_ns=0), "the control marker vanished: the scan is broken"

    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        d = client.describe_dbinstance_encryption_key(rds.DescribeDBInstanceEncryptionKeyRequest(
            dbinstance_id=instance.id)).body
        assert (d.encryption_key, d.encryption_key_status) == (cmk["Arn"], "Enabled")
        assert d.key_usage == "ENCRYPT_DECRYPT" and d.origin == "AWS_KMS"
        assert d.description == "strata backups" and d.creator == cmk["AWSAccountId"]
        assert [k.key_type for k in d.encryption_key_list] == ["CMK"]
        assert d.encryption_key_list[0].encryption_key_status == "Enabled"

    # Disabled: no new backup, no restore, a clear code; the state shows.
    kms("DisableKey", KeyId=cmk["KeyId"])
    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        e = h.expect_error("InvalidKmsKey.Disabled", 403, client.create_backup,
                           rds.CreateBackupRequest(dbinstance_id=instance.id))
        assert "not usable" in e.message
        h.expect_error("InvalidKmsKey.Disabled", 403, client.clone_dbinstance,
                       rds.CloneDBInstanceRequest(dbinstance_id=instance.id, backup_id=encrypted_set))
        d = client.describe_dbinstance_encryption_key(rds.DescribeDBInstanceEncryptionKeyRequest(
            dbinstance_id=instance.id)).body
        assert d.encryption_key_status == "Disabled"
    kms("EnableKey", KeyId=cmk["KeyId"])

    # Rotation re-wraps the data key; no pack changes.
    before_packs = packs()
    body = h.call(admin, "StrataRotateBackupEncryptionKey", DBInstanceId=instance.id)
    assert body["StrataKeyVersion"] == 2
    rotated = key_record(instance.id)
    assert rotated["wrapped_key"] != record["wrapped_key"]
    assert rotated["key_domain"] == record["key_domain"] and rotated["rotated_at"]
    assert packs() == before_packs

    # Restores work again, from the encrypted set and from the one before.
    v2 = h.make_client("v2", *h.admin_key())
    clone = v2.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, backup_id=encrypted_set)).body.dbinstance_id
    a, _ = wait_running(v2, clone)
    assert psql_at(int(a["Port"]), "SELECT note FROM enc_after") == secret
    assert psql_at(int(a["Port"]), "SELECT note FROM enc_before") == before
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone))
    old = admin.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, backup_id=first_set)).body.dbinstance_id
    a, _ = wait_running(admin, old)
    assert psql_at(int(a["Port"]), "SELECT to_regclass('enc_before') IS NULL") == "t"
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=old))

    # A new backup after re-enabling works and stays in the instance's domain.
    h.backup(admin, instance.id)
    # Clones are instances of their own (not encrypted): only this
    # instance's objects are looked at now; every pack was above.
    assert repo_contains(secret, under=f"instances/{instance.id}") is None


def strata(*args):
    """The CLI on the server's configuration: (exit code, stdout, stderr)."""
    out = subprocess.run([h.env("STRATA_BIN"), "--config", h.env("STRATA_CONFIG"), *args],
                         capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


def gc():
    """One garbage collection (retried while a backup holds the repository)."""
    for _ in range(60):
        code, out, err = strata("repo", "gc", "--json")
        assert code == 0, err
        if out.strip() != "null":
            return json.loads(out)
        time.sleep(1)
    raise AssertionError("garbage collection was skipped for a minute")


def domain_of(pack_path):
    with open(pack_path, "rb") as f:
        header = f.read(16)
    return int.from_bytes(header[10:14], "little") if header[8:10] == b"\x03\x00" else 0


def pack_path(name):
    return os.path.join(repo_dir(), "packs", name[:2], name)


def test_repository_wide_jobs_read_encrypted_instances(instance, admin, cmk):
    domain = key_record(instance.id)["key_domain"]
    # Log backup off: a set younger than the log retention may be deleted.
    admin.modify_backup_policy(rds.ModifyBackupPolicyRequest(
        dbinstance_id=instance.id, backup_policy_mode="LogBackupPolicy", enable_backup_log="False"))
    h.psql("CREATE TABLE gc_kept AS SELECT i FROM generate_series(1, 2000) i;")
    before = set(packs())
    # 40 MB of random bytes: packs hold 16 MB, so some hold nothing else
    # and no later set references them once the table is gone.
    h.psql("CREATE TABLE gc_dropped AS SELECT decode(string_agg(md5(random()::text), ''), 'hex') "
           "AS noise FROM generate_series(1, 2621440) i GROUP BY i % 40000;")
    dropped = h.backup(admin, instance.id).backup_id
    dropped_packs = set(packs()) - before
    assert len(dropped_packs) >= 2, dropped_packs
    assert {domain_of(pack_path(p)) for p in dropped_packs} == {domain}
    h.psql("DROP TABLE gc_dropped; CHECKPOINT;")
    last = h.backup(admin, instance.id).backup_id

    # Disabled CMK: garbage collection refuses, naming the instance and
    # key, and deletes nothing; usage still answers and marks the instance.
    kms("DisableKey", KeyId=cmk["KeyId"])
    try:
        admin.delete_backup(rds.DeleteBackupRequest(dbinstance_id=instance.id, backup_id=dropped))
        # The service's own collection, which the deletion asks for at its
        # next tick, holds the domain's key since before it was disabled and
        # may reclaim the packs first: let it, so that what follows sees
        # only what the command does.
        deadline = time.time() + 3
        while dropped_packs & set(packs()) and time.time() < deadline:
            time.sleep(0.1)
        held = packs()
        code, out, err = strata("repo", "gc", "--json")
        assert code != 0, out
        assert instance.id in err and cmk["Arn"] in err and "nothing was done" in err, err
        assert packs() == held
        status, _, text = h.http_get("/metrics")
        assert status == 200 and "strata_" in text
        for job in (["repo", "verify"], ["repo", "reindex"]):
            code, out, err = strata(*job)
            assert code != 0 and instance.id in err and "nothing was done" in err, (job, err)
        code, out, err = strata("repo", "usage", "--json")
        assert code == 0, err
        usage = json.loads(out)
        assert usage["instances"][instance.id]["locked"] is True, usage
        assert usage["total_bytes"] > 0
    finally:
        kms("EnableKey", KeyId=cmk["KeyId"])

    # Enabled again: the collection reads the instance's sets and reclaims
    # the packs only the deleted set used (the service's own scheduled
    # collection may get there first).
    report = gc()
    if not dropped_packs - set(packs()):
        report = gc()
    assert dropped_packs - set(packs()), report
    code, out, err = strata("repo", "usage", "--json")
    assert code == 0 and "locked" not in json.loads(out)["instances"][instance.id], out

    # Verify reads every domain: clean, then a damaged pack of the instance is found.
    code, out, err = strata("repo", "verify", "--json")
    assert code == 0, err + out
    assert json.loads(out)["problems"] == []
    victim = next(p for p in sorted(packs()) if domain_of(pack_path(p)) == domain)
    with open(pack_path(victim), "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0xFF]))
    try:
        code, out, err = strata("repo", "verify", "--json")
        assert code != 0 and victim.removesuffix(".pack") in out, err + out
    finally:
        with open(pack_path(victim), "r+b") as f:
            f.seek(64)
            f.write(byte)

    # The set's databases, read in the instance's domain.
    raw = h.call(admin, "DescribeBackupDatabase", DBInstanceId=instance.id, BackupId=last)
    assert "postgres" in raw["StrataDatabaseNames"] and raw["StrataBackupId"] == last

    # The remaining set restores with its rows.
    v2 = h.make_client("v2", *h.admin_key())
    clone = v2.clone_dbinstance(rds.CloneDBInstanceRequest(
        dbinstance_id=instance.id, backup_id=last)).body.dbinstance_id
    a, _ = wait_running(v2, clone)
    assert psql_at(int(a["Port"]), "SELECT count(*) FROM gc_kept") == "2000"
    assert psql_at(int(a["Port"]), "SELECT to_regclass('gc_dropped') IS NULL") == "t"
    admin.delete_dbinstance(rds.DeleteDBInstanceRequest(dbinstance_id=clone))

    # Reindex reads the encrypted instance's sets back into the catalog.
    code, out, err = strata("repo", "reindex")
    assert code == 0, err
    listed = [b.backup_id for b in h.describe_backups(admin, instance.id).items.backup]
    assert last in listed and dropped not in listed, listed
