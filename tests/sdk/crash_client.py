"""Client side of the crash test in crates/strata/tests/api.rs, through the
official SDK. The Rust side starts the server (automatic backups throttled),
runs `start`, kills the server with SIGKILL, starts it again on the same
data directory and runs `after-restart`.

    crash_client.py start INSTANCE_ID STATE_FILE
        registers the instance, waits until its automatic first backup is
        uploading (in progress, not done), sends one hand-signed request, and
        writes {instance, job, backup, request} to STATE_FILE.
    crash_client.py after-restart STATE_FILE [REASON]
        the job is Failed with a StrataErrorMessage (containing REASON when
        given), its backup set Failed (never Success), the request sent
        before the crash is refused as a replay, and a new CreateBackup runs
        to Finished.
"""

import json
import sys
import time

import helpers as h

def log(msg):
    print(f"crash_client: {msg}", flush=True)


def start(instance_id, state_file):
    client = h.make_client("v3", *h.admin_key())
    reg = h.register(client, instance_id)
    assert reg["EngineVersion"] == "15", reg
    deadline = time.monotonic() + 60
    while True:
        found = h.jobs(client, instance_id)
        job = found[0] if found else None
        if job and job["BackupStatus"] in ("Finished", "Failed"):
            raise AssertionError(f"the throttled first backup ended before the crash: {job}")
        if (
            job
            and job["BackupStatus"] == "Uploading"
            and job["BackupId"]
            and 0 < int(job["Process"].rstrip("%")) < 90
        ):
            break
        assert time.monotonic() < deadline, f"first backup never uploading: {found}"
        time.sleep(0.2)
    assert job["JobMode"] == "Automated", job
    (b,) = h.describe_backups(client, instance_id, backup_id=job["BackupId"]).items.backup
    assert b.backup_status == "Running", b.to_map()
    # A signed request that succeeds now; after the restart it is a replay.
    key_id, secret = h.admin_key()
    request = h.sign_v3("DescribeDBInstances", {"PageSize": "30"}, key_id, secret)
    status, body = h.send(request)
    assert status == 200, body
    method, target, headers, payload = request
    state = {
        "instance": instance_id,
        "job": job["BackupJobId"],
        "backup": job["BackupId"],
        "request": [method, target, headers, payload.decode()],
    }
    with open(state_file, "w") as f:
        json.dump(state, f)
    log(f"job {job['BackupJobId']} {job['BackupStatus']} {job['Process']}: kill the server now")


def after_restart(state_file, reason=None):
    with open(state_file) as f:
        state = json.load(f)
    instance_id, job_id, backup_id = state["instance"], state["job"], state["backup"]
    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        deadline = time.monotonic() + 30
        while True:
            (job,) = h.jobs(client, instance_id, BackupJobId=job_id)
            if job["BackupStatus"] not in h.IN_PROGRESS:
                break
            assert time.monotonic() < deadline, f"job still {job['BackupStatus']} after restart: {job}"
            time.sleep(0.2)
        assert job["BackupStatus"] == "Failed", job
        assert job["BackupProgressStatus"] == "Failed", job
        assert job["BackupId"] == backup_id, job
        assert job.get("StrataErrorMessage", "").strip(), job
        assert reason is None or reason in job["StrataErrorMessage"], job
        assert job.get("StrataEndTime"), job
        log(f"[{sig}] job {job_id}: Failed: {job['StrataErrorMessage']}")

        raw = h.call(client, "DescribeBackups", DBInstanceId=instance_id, BackupId=backup_id)
        (b,) = raw["Items"]["Backup"]
        assert b["BackupStatus"] == "Failed", b
        assert b["IsAvail"] == 0, b
        assert b.get("StrataErrorMessage", "").strip(), b
        assert reason is None or reason in b["StrataErrorMessage"], b
        ok = h.describe_backups(client, instance_id, backup_status="Success")
        assert backup_id not in [x.backup_id for x in ok.items.backup]
        failed = h.describe_backups(client, instance_id, backup_status="Failed")
        assert [x.backup_id for x in failed.items.backup] == [backup_id]

    # Nonces are kept across restarts: the request sent before the crash is a replay.
    method, target, headers, payload = state["request"]
    status, body = h.send((method, target, headers, payload.encode()))
    assert (status, body.get("Code")) == (400, "SignatureNonceUsed"), (status, body)

    for sig in h.SIGNATURES:
        client = h.make_client(sig, *h.admin_key())
        job = h.backup(client, instance_id)
        assert job.job_mode == "Manual"
        (b,) = h.describe_backups(client, instance_id, backup_id=job.backup_id).items.backup
        assert (b.backup_status, b.backup_mode) == ("Success", "Manual"), b.to_map()
        assert b.backup_size > 50_000_000, "the pgbench data is in the backup"
        log(f"[{sig}] new backup {job.backup_id}: {b.backup_status}, {b.backup_size} bytes")
        (old,) = h.describe_backups(client, instance_id, backup_id=backup_id).items.backup
        assert old.backup_status == "Failed", old.to_map()
    h.retire(h.make_client("v3", *h.admin_key()), instance_id)


def main(argv):
    if len(argv) == 4 and argv[1] == "start":
        start(argv[2], argv[3])
    elif len(argv) in (3, 4) and argv[1] == "after-restart":
        after_restart(*argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
