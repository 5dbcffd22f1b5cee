"""Test helpers for real servers and a real browser: ``mlflow server``, headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None,
                 backend_store_uri: str | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until ``/health`` answers (``timeout`` s at most)."""
        cmd = [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.log = open(self.root / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_http(self.url + "/health", timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.proc = None


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Debian's chromium is required (.ci/run installs it)")
    return path


def headless(url: str, tmp: Path, screenshot: Path | None = None) -> str:
    """Render ``url`` in headless Chromium; return the DOM (and save a screenshot)."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,900", "--virtual-time-budget=15000",
    ]
    profile = tmp / f"chrome-{time.time_ns()}"
    if screenshot is not None:
        subprocess.run([chromium(), *flags, f"--user-data-dir={profile}-s",
                        f"--screenshot={screenshot}", url], capture_output=True, timeout=120,
                       check=True)
    out = subprocess.run([chromium(), *flags, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, timeout=120, check=True, text=True)
    return out.stdout


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def runs_table(server_url: str, exp_id: str, search: str, columns: list[str],
               screenshot: Path | None = None) -> list[str]:
    """Open the MLflow runs table in a real browser, show ``columns``, return its rows' text.

    Playwright drives Debian's chromium (``executable_path``): no browser is downloaded.
    """
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 700})
            page.goto(f"{server_url}/#/experiments/{exp_id}/runs?searchFilter={quote(search)}")
            page.get_by_role("row").nth(2).wait_for(timeout=60_000)
            _close_assistant(page)
            page.get_by_role("button", name="Columns").click()
            for col in ["Dataset", "Source", "Models", *columns]:  # hide 3 defaults, add ours
                page.get_by_placeholder("Search columns").fill(col)
                item = page.get_by_role("menuitemcheckbox", name=col, exact=True)
                if not item.count():  # MLflow 3's column tree: the title that is exactly col
                    item = page.locator(".du-bois-light-tree-title").filter(
                        has_text=re.compile(rf"^{re.escape(col)}$"))
                (item if item.count() else page.get_by_text(col, exact=True)).last.click()
            page.keyboard.press("Escape")
            page.wait_for_timeout(1000)
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            return page.get_by_role("row").all_inner_texts()
        finally:
            browser.close()


def _close_assistant(page) -> None:
    """Close MLflow's assistant side panel (its *Close* button) if it is open."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def compare_metrics(compare_url: str, params: list[str], metrics: list[str],
                    screenshot: Path | None = None) -> str:
    """Open the compare-runs page with its parallel-coordinates plot set to ``params`` and
    ``metrics`` (one line per run through its values), the assistant panel closed; return the
    page's text.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(compare_url)
            page.get_by_text("Run details").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            _close_assistant(page)
            page.get_by_test_id("clear-button").click()
            boxes = page.get_by_role("combobox")
            for i, keys in enumerate((params, metrics)):
                for key in keys:
                    boxes.nth(i).click()
                    boxes.nth(i).fill(key)
                    page.locator(f".du-bois-light-select-item-option[title='{key}']").click()
                page.keyboard.press("Escape")
            page.mouse.click(5, 5)
            page.wait_for_timeout(1500)
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            return page.inner_text("body")
        finally:
            browser.close()


def page_screenshot(url: str, screenshot: Path, width: int = 1400, height: int = 900,
                    wait_for: str | None = None) -> str:
    """Render ``url`` (e.g. a ``file://`` report) in headless Chromium, save the visible
    ``width`` x ``height`` screenshot and return the page's text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            if wait_for:
                page.get_by_text(wait_for).first.wait_for(timeout=60_000)
            page.wait_for_load_state("load")
            page.screenshot(path=str(screenshot))
            return page.inner_text("body")
        finally:
            browser.close()


PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder (``initdb``, ``pg_ctl``), None if absent."""
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return next((p for p in reversed(found) if (p / "initdb").is_file()), None)


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port (trust auth, user postgres).

    ``initdb`` refuses to run as root, so as root every server command runs through
    ``runuser -u postgres`` and the data folder is given to that user.
    """

    def __init__(self, root: Path, bin_dir: Path, port: int | None = None) -> None:
        self.root = root
        self.bin = bin_dir
        self.port = port or free_port()
        self.data = root / "pgdata"
        self.sock = root / "pgsock"
        self.started = False

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._as_owner(*cmd), capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C.UTF-8"})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in (self.root, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.root.chmod(0o700)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts,
                  "-l", str(self.root / "postgres.log"), "-w", "-t", "60", "start")
        self.started = True

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL (psycopg2 driver)."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "postgres", name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.started:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "stop")
            self.started = False
