"""Fixtures for the console's browser tests.

Run through `cargo test -p strata --test console`, which starts PostgreSQL and
`strata serve`, registers the instance, creates the keys and passes them here
in STRATA_* environment variables. The browser is Debian's headless Chromium
with its chromedriver; the browser's time zone is set to Asia/Shanghai so the
tests can tell local times from UTC.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TIME_ZONE = "Asia/Shanghai"
# Screenshots also copied into docs/ when STRATA_UPDATE_DOCS_SCREENSHOTS=1.
DOCS_SHOTS = {"instances", "task-center", "base-backups", "backup-strategy-error", "storage", "restore",
              "cross-region"}


def need(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: run these tests with `cargo test -p strata --test console`",
            returncode=2,
        )
    return value


class Console:
    """The browser, pointed at one Strata server."""

    def __init__(self, driver, base, shots):
        self.d = driver
        self.base = base
        self.shots = shots

    def go(self, path):
        self.d.get(self.base + path)

    def path(self):
        return self.d.current_url[len(self.base):]

    def find(self, css):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def finds(self, css):
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def text(self, css):
        return self.find(css).text

    def wait(self, what, cond, timeout=30):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(lambda d: cond())
        except TimeoutException:
            self.shot("timeout")
            raise AssertionError(f"timed out after {timeout}s waiting for {what} on {self.d.current_url}")

    def click_through(self, element):
        """Clicks something that loads a page, and waits for the new page."""
        old = self.find("html")
        element.click()

        def replaced():
            # During navigation chromedriver reports the old node either as
            # stale or as not belonging to the document: both mean "gone".
            try:
                old.is_enabled()
                return False
            except WebDriverException:
                return True

        self.wait("the next page", replaced)

    def viewport(self, width, height, mobile=False):
        self.d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    def shot(self, name):
        path = os.path.join(self.shots, f"{name}.png")
        self.d.save_screenshot(path)
        docs = os.environ.get("STRATA_DOCS_DIR")
        if name in DOCS_SHOTS and docs and os.environ.get("STRATA_UPDATE_DOCS_SCREENSHOTS") == "1":
            shutil.copy(path, os.path.join(docs, f"console-{name}.png"))
        return path

    def sign_in(self, key_id, secret):
        self.go("/console/signin")
        self.find("input[name=access_key_id]").send_keys(key_id)
        self.find("input[name=access_key_secret]").send_keys(secret)
        self.click_through(self.find(".signin button[type=submit]"))

    def sign_out(self):
        self.click_through(self.find(".whoami button"))
        self.wait("the sign-in page", lambda: self.path().startswith("/console/signin"))

    def no_horizontal_scroll(self):
        return self.d.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1"
        )


@pytest.fixture(scope="session")
def env():
    return {
        "url": need("STRATA_URL"),
        "instance": need("STRATA_INSTANCE"),
        "admin": (need("STRATA_ADMIN_KEY_ID"), need("STRATA_ADMIN_KEY_SECRET")),
        "reader": (need("STRATA_RO_KEY_ID"), need("STRATA_RO_KEY_SECRET")),
        "bin": need("STRATA_BIN"),
        "config": need("STRATA_CONFIG"),
        "shots": need("STRATA_SCREENSHOTS"),
        "pg_host": need("STRATA_PG_HOST"),
        "pg_port": int(need("STRATA_PG_PORT")),
        "pg_bin": need("STRATA_PG_BIN"),
    }


@pytest.fixture(scope="session")
def console(env):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": TIME_ZONE})
        c = Console(driver, env["url"], env["shots"])
        c.viewport(1280, 800)
        yield c
    finally:
        driver.quit()


class Api:
    """Strata's RDS API as a client sees it: the official SDK when the venv
    has it, else scripts/rds-curl.sh (V2-signed requests with curl)."""

    def __init__(self, env):
        self.env = env
        try:
            from alibabacloud_rds20140815.client import Client
            from alibabacloud_tea_openapi.models import Config

            key_id, secret = env["admin"]
            host = env["url"].split("://", 1)[1]
            self.sdk = Client(
                Config(access_key_id=key_id, access_key_secret=secret, endpoint=host, protocol="http")
            )
        except ImportError:
            self.sdk = None

    def delete_instance(self, instance):
        """DeleteDBInstance (instances Strata created: stops and removes them)."""
        if self.sdk is not None:
            from alibabacloud_rds20140815 import models

            self.sdk.delete_dbinstance(models.DeleteDBInstanceRequest(dbinstance_id=instance))
            return
        self._curl("DeleteDBInstance", f"DBInstanceId={instance}")

    def _curl(self, action, *params):
        key_id, secret = self.env["admin"]
        script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "rds-curl.sh")
        out = subprocess.run(
            ["bash", script, action, *params],
            env={**os.environ, "STRATA_ENDPOINT": self.env["url"], "STRATA_KEY_ID": key_id, "STRATA_KEY_SECRET": secret},
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)

    def backup_policy(self, instance):
        if self.sdk is not None:
            from alibabacloud_rds20140815 import models

            body = self.sdk.describe_backup_policy(
                models.DescribeBackupPolicyRequest(dbinstance_id=instance)
            ).body
            return {
                "PreferredBackupPeriod": body.preferred_backup_period,
                "PreferredBackupTime": body.preferred_backup_time,
                "BackupRetentionPeriod": int(body.backup_retention_period),
                "EnableBackupLog": body.enable_backup_log,
                "LogBackupRetentionPeriod": int(body.log_backup_retention_period),
            }
        body = self._curl("DescribeBackupPolicy", f"DBInstanceId={instance}")
        return {k: body[k] for k in POLICY_FIELDS}


    def policy_answer(self, instance):
        """DescribeBackupPolicy's whole answer, retention options included
        (through scripts/rds-curl.sh: Strata's extension fields are not in
        the SDK's models)."""
        return self._curl("DescribeBackupPolicy", f"DBInstanceId={instance}")

    def create_backup(self, instance):
        return self._curl("CreateBackup", f"DBInstanceId={instance}")

    def storage_usage(self, instance):
        """StrataDescribeBackupStorageUsage (an extension action: its fields
        are not in the SDK's models), through scripts/rds-curl.sh."""
        key_id, secret = self.env["admin"]
        script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "rds-curl.sh")
        out = subprocess.run(
            ["bash", script, "StrataDescribeBackupStorageUsage", f"DBInstanceId={instance}"],
            env={**os.environ, "STRATA_ENDPOINT": self.env["url"], "STRATA_KEY_ID": key_id, "STRATA_KEY_SECRET": secret},
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)


POLICY_FIELDS = (
    "PreferredBackupPeriod",
    "PreferredBackupTime",
    "BackupRetentionPeriod",
    "EnableBackupLog",
    "LogBackupRetentionPeriod",
)


@pytest.fixture(scope="session")
def api(env):
    return Api(env)


def strata_json(env, *args):
    """`strata ARGS --json` against the server's catalog."""
    out = subprocess.run(
        [env["bin"], "--config", env["config"], *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def psql(env, sql, port=None, db="postgres"):
    """One query with the `psql` binary as the `postgres` OS user (the
    clusters trust it); `port` defaults to the source instance's."""
    cmd = [os.path.join(env["pg_bin"], "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
           "-h", env["pg_host"] if port is None else "127.0.0.1",
           "-p", str(env["pg_port"] if port is None else port), "-U", "postgres", "-d", db, "-c", sql]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=120)
    assert out.returncode == 0, f"psql on port {port or env['pg_port']} failed: {out.stderr}\n{sql}"
    return out.stdout.strip()


def answers(env, port):
    """Whether a PostgreSQL server accepts connections on `port`."""
    cmd = [os.path.join(env["pg_bin"], "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def task_row(console, type_label, job=None):
    """The Task Center row of task `job`, or the newest of that type."""
    rows = [r for r in console.finds("tr[data-task]")
            if r.find_element("css selector", "td[data-f=type]").text == type_label
            and job in (None, r.get_attribute("data-task"))]
    return max(rows, key=lambda r: int(r.get_attribute("data-task")), default=None)


def wait_task_finished(console, type_label, job=None, timeout=240):
    """Waits in the live Task Center until that task ends; returns its row."""
    seen = {}

    def ended():
        row = task_row(console, type_label, job)
        if row is None:
            return False
        status = row.find_element("css selector", "td[data-f=status] .badge").text
        seen["text"] = row.text
        return status in ("Finished", "Failed") and row

    row = console.wait(f"the {type_label} task to end", ended, timeout=timeout)
    assert row.find_element("css selector", "td[data-f=status] .badge").text == "Finished", seen
    return row


def wait_clone_running(console, clone, timeout=180):
    """Reloads the instance list until `clone` is Running; returns its row
    (a clone is Creating until restored, and its first backup may run
    before it is listed Running)."""

    def running():
        time.sleep(1)
        console.go("/console/")
        rows = console.finds(f"tr[data-instance='{clone}']")
        return rows and "Running" in rows[0].find_element("css selector", "td:nth-child(4)").text and rows[0]

    return console.wait("the clone listed as Running", running, timeout=timeout)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test leaves a screenshot and the page's HTML beside the others."""
    outcome = yield
    report = outcome.get_result()
    c = item.funcargs.get("console") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and c is not None:
        name = f"FAILED-{item.name}"
        c.shot(name)
        with open(os.path.join(c.shots, f"{name}.html"), "w") as f:
            f.write(f"<!-- {c.d.current_url} -->\n{c.d.page_source}")
