"""The Notifications page in headless Chromium: the configured sinks are
listed with their routing and without any secret, "Send test" reaches a
webhook receiver running here (its HMAC signature checked) and reports a sink
nobody answers as failed, both deliveries are listed, a request without the
session's token is refused, and a read-only key is offered no button and is
refused when it posts anyway. The tests run in file order.
"""

import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

PAGE = "/console/notifications"


class Receiver(BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.headers, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = HTTPServer(("127.0.0.1", int(os.environ["STRATA_HOOK_PORT"])), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Receiver.received
    server.shutdown()
    server.server_close()


def row(console, sink):
    return console.find(f"#sinks tr[data-sink={sink}]")


def send_test(console, sink):
    button = row(console, sink).find_element("css selector", "button[type=submit]")
    assert button.text == "Send test"
    console.click_through(button)
    assert console.path() == PAGE


def test_sinks_are_listed_without_secrets(console, env, receiver):
    console.sign_in(*env["admin"])
    console.click_through(console.find('nav.mainnav a[href="/console/notifications"]'))
    assert console.path() == PAGE
    names = [r.get_attribute("data-sink") for r in console.finds("#sinks tbody tr")]
    assert names == ["ops", "dead", "dba"]
    hook, dead = os.environ["STRATA_HOOK_PORT"], os.environ["STRATA_DEAD_PORT"]
    ops = row(console, "ops")
    assert ops.find_element("css selector", "td.target").text == f"http://127.0.0.1:{hook}/…"
    assert ops.find_element("css selector", "td.instances").text == env["instance"]
    assert ops.find_element("css selector", "td.events").text == "backup-failed, drill-failed"
    assert row(console, "dead").find_element("css selector", "td.instances").text == "all"
    dba = row(console, "dba")
    assert dba.find_element("css selector", "td.target").text == f"127.0.0.1:{dead} to dba@example.com"
    assert "email" in dba.text
    source = console.d.page_source
    for secret in os.environ["STRATA_HIDDEN"].split(","):
        assert secret not in source, secret
    console.shot("notifications")


def test_send_test_reaches_the_receiver(console, env, receiver):
    send_test(console, "ops")
    console.wait("the delivered notice", lambda: console.finds(".notice.ok"))
    notice = console.text(".notice.ok")
    assert "Test notification delivered to ops: HTTP 200 after 1 attempt(s)" in notice, notice
    assert len(receiver) == 1
    headers, body = receiver[0]
    event = json.loads(body)
    assert event["kind"] == "test"
    assert event["instance"] is None
    assert "the Strata console" in event["message"]
    ts = headers["X-Strata-Timestamp"]
    assert abs(time.time() - int(ts)) < 300
    secret = os.environ["STRATA_HOOK_SECRET"].encode()
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Strata-Signature"], f"sha256={mac}")
    assert headers["X-Strata-Event"] == "test"
    delivery = console.find("#deliveries tbody tr")
    assert "test to webhook ops: HTTP 200 after 1 attempt(s)" in delivery.text
    assert "Finished" in delivery.text


def test_a_failing_sink_shows_the_failure(console, env, receiver):
    send_test(console, "dead")
    console.wait("the failed notice", lambda: console.finds(".notice.err"))
    notice = console.text(".notice.err")
    assert "The test notification to dead failed" in notice, notice
    newest = console.find("#deliveries tbody tr")
    assert "test to webhook dead" in newest.text
    assert "Failed" in newest.text
    # Nothing reached the live receiver.
    assert len(receiver) == 1
    for secret in os.environ["STRATA_HIDDEN"].split(","):
        assert secret not in console.d.page_source, secret
    console.shot("notifications-failed")


def post_test(console, sink, csrf):
    """Submits a Send test form built here, as a page could forge one."""
    old = console.find("html")
    console.d.execute_script(
        """
        const f = document.createElement('form');
        f.method = 'post';
        f.action = arguments[0];
        for (const [name, value] of [['sink', arguments[1]], ['csrf', arguments[2]]]) {
            if (value === null) continue;
            const i = document.createElement('input');
            i.type = 'hidden'; i.name = name; i.value = value;
            f.appendChild(i);
        }
        document.body.appendChild(f);
        f.submit();
        """,
        PAGE + "/test",
        sink,
        csrf,
    )
    console.wait("the answer", lambda: console.finds("h1") and console.find("html") != old)


def test_a_request_without_the_session_token_is_refused(console, env, receiver):
    post_test(console, "ops", None)
    console.wait("the refusal", lambda: console.text("h1") == "Request refused")
    assert len(receiver) == 1


def test_a_read_only_key_gets_no_button_and_is_refused(console, env, receiver):
    console.sign_out()
    console.sign_in(*env["reader"])
    console.go(PAGE)
    assert [r.get_attribute("data-sink") for r in console.finds("#sinks tbody tr")] == ["ops", "dead", "dba"]
    assert not console.finds("#sinks button")
    assert len(console.finds("#deliveries tbody tr")) == 2
    # Even with its own session token, the request is refused.
    token = console.find("input[name=csrf]").get_attribute("value")
    post_test(console, "ops", token)
    console.wait("the refusal notice", lambda: console.finds(".notice.err"))
    assert "read-only AccessKey" in console.text(".notice.err")
    assert len(receiver) == 1
    assert len(console.finds("#deliveries tbody tr")) == 2
