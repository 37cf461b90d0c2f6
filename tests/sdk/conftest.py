"""Fixtures: SDK clients for both signature versions and a freshly registered
instance per test module (so modules do not depend on each other; each
instance id has its own replication slot on the PostgreSQL server)."""

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h


@pytest.fixture(params=h.SIGNATURES)
def sig(request):
    """Every test that uses `client` runs once with V3 and once with V2."""
    return request.param


@pytest.fixture
def client(sig):
    return h.make_client(sig, *h.admin_key())


@pytest.fixture
def ro_client(sig):
    return h.make_client(sig, *h.read_only_key())


@pytest.fixture(scope="module")
def admin():
    """A V3 client for setup and teardown."""
    return h.make_client("v3", *h.admin_key())


class Registered:
    def __init__(self, instance_id, registration, first_job):
        self.id = instance_id
        self.registration = registration
        self.first_job = first_job


@pytest.fixture(scope="module")
def instance(request, admin):
    """Registers the test PostgreSQL server under a new id, waits for the
    automatic first backup, and deregisters it after the module."""
    prefix = request.module.__name__.removeprefix("test_")[:10]
    instance_id = h.new_instance_id(prefix)
    body = h.register(admin, instance_id)
    first = h.wait_first_backup(admin, instance_id)
    if not getattr(request.module, "KEEP_DEFAULT_POLICY", False):
        # The default window is derived from the id: move it half a day away
        # so no automatic backup can start while the module runs.
        hour = (h.utcnow().hour + 12) % 24
        admin.modify_backup_policy(
            rds.ModifyBackupPolicyRequest(
                dbinstance_id=instance_id,
                preferred_backup_time=f"{hour:02d}:00Z-{(hour + 1) % 24:02d}:00Z",
            )
        )
    yield Registered(instance_id, body, first)
    h.retire(admin, instance_id)
