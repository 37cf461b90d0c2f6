"""Authentication. Signed calls go through the official SDK; the requests
the SDK cannot send (tampered, expired, replayed, unsigned) are built by hand
with both signature versions. Each hand-made signer is first shown to be
accepted, so every refusal below is about the one thing changed."""

import datetime as dt
import re
import uuid

import pytest
from alibabacloud_rds20140815 import models as rds

import helpers as h

ACTION = "DescribeDBInstances"
PARAMS = {"PageSize": "30", "PageNumber": "1"}


def error(status, body, code, http_status):
    assert (status, body.get("Code")) == (http_status, code), body
    assert body.get("RequestId") and body.get("HostId") and body.get("Message"), body


def signed(sig, **kw):
    key_id, secret = h.admin_key()
    return h.sign(sig, ACTION, dict(PARAMS), key_id, secret, **kw)


def with_query(request, old, new):
    method, target, headers, body = request
    assert old in target, target
    return method, target.replace(old, new), headers, body


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_hand_signed_request_is_accepted(sig):
    status, body = h.send(signed(sig))
    assert status == 200, body
    assert body["PageNumber"] == 1 and "DBInstance" in body["Items"] and body["RequestId"]


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_tampered_parameter(sig):
    request = with_query(signed(sig), "PageSize=30", "PageSize=100")
    status, body = h.send(request)
    error(status, body, "SignatureDoesNotMatch", 400)


def test_tampered_v3_signed_header():
    method, target, headers, body = signed("v3")
    headers = dict(headers, **{"x-acs-action": "CreateBackup"})
    status, resp = h.send((method, target, headers, body))
    error(status, resp, "SignatureDoesNotMatch", 400)


def test_tampered_v2_action():
    request = with_query(signed("v2"), "Action=DescribeDBInstances", "Action=DescribeBackups")
    status, body = h.send(request)
    error(status, body, "SignatureDoesNotMatch", 400)


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_wrong_secret(sig):
    key_id, secret = h.admin_key()
    status, body = h.send(h.sign(sig, ACTION, dict(PARAMS), key_id, secret + "x"))
    error(status, body, "SignatureDoesNotMatch", 400)
    sdk = h.make_client(sig, key_id, secret[::-1])
    h.expect_error("SignatureDoesNotMatch", 400, sdk.describe_dbinstances, rds.DescribeDBInstancesRequest())


@pytest.mark.parametrize("sig", h.SIGNATURES)
@pytest.mark.parametrize("minutes", [-20, 20])
def test_timestamp_more_than_15_minutes_off(sig, minutes):
    when = h.utcnow() + dt.timedelta(minutes=minutes)
    status, body = h.send(signed(sig, when=when))
    error(status, body, "InvalidTimeStamp.Expired", 400)
    # 10 minutes off is inside the window.
    status, body = h.send(signed(sig, when=h.utcnow() + dt.timedelta(minutes=minutes // 2)))
    assert status == 200, body


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_replayed_request(sig):
    request = signed(sig)
    status, body = h.send(request)
    assert status == 200, body
    status, body = h.send(request)
    error(status, body, "SignatureNonceUsed", 400)
    # The same nonce in a freshly signed request is refused too.
    nonce = uuid.uuid4().hex
    assert h.send(signed(sig, nonce=nonce))[0] == 200
    status, body = h.send(signed(sig, nonce=nonce))
    error(status, body, "SignatureNonceUsed", 400)


def test_unsigned_request():
    target = "/?" + h.canonical_query({"Action": ACTION, "Version": h.API_VERSION, **PARAMS})
    status, body = h.send(("POST", target, {"host": h.endpoint()}, b""))
    error(status, body, "IncompleteSignature", 400)
    status, body = h.send(("GET", target, {"host": h.endpoint()}, b""))
    error(status, body, "IncompleteSignature", 400)


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_signature_parts_removed(sig):
    method, target, headers, body = signed(sig)
    if sig == "v3":
        headers = {k: v for k, v in headers.items() if k != "authorization"}
    else:
        target = re.sub(r"&Signature=[^&]*", "", target)
    status, resp = h.send((method, target, headers, body))
    error(status, resp, "IncompleteSignature", 400)


@pytest.mark.parametrize("sig", h.SIGNATURES)
def test_unknown_access_key(sig):
    _, secret = h.admin_key()
    status, body = h.send(h.sign(sig, ACTION, dict(PARAMS), "STRATANOSUCHKEY000000000", secret))
    error(status, body, "InvalidAccessKeyId.NotFound", 404)
    sdk = h.make_client(sig, "STRATANOSUCHKEY000000000", secret)
    h.expect_error("InvalidAccessKeyId.NotFound", 404, sdk.describe_dbinstances, rds.DescribeDBInstancesRequest())


def test_unknown_action_and_version(client):
    h.expect_error("InvalidAction.NotFound", 404, h.call, client, "DescribeEverything")
    host = {"host": h.endpoint()}
    target = "/?" + h.canonical_query({"Action": ACTION, "Version": "2013-05-28"})
    status, body = h.send(("POST", target, host, b""))
    error(status, body, "InvalidVersion", 400)
    status, body = h.send(("POST", "/?" + h.canonical_query({"Version": h.API_VERSION}), host, b""))
    error(status, body, "MissingParameter", 400)


def test_health_and_metrics_need_no_signature():
    status, _, text = h.http_get("/healthz")
    assert (status, text.strip()) == (200, "ok")
    status, ctype, text = h.http_get("/metrics")
    assert status == 200 and ctype.startswith("text/plain"), ctype
    assert "# TYPE strata_jobs gauge" in text
    assert re.search(r'^strata_jobs\{state="Finished"\} \d+$', text, re.M), text
