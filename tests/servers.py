"""Test helpers for real servers and a real browser: ``mlflow server``, headless Chromium."""

from __future__ import annotations

import os
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
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.log = open(self.root / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_http(self.url + "/health", 90)

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
            page.get_by_role("button", name="Columns").click()
            for col in ["Dataset", "Source", "Models", *columns]:  # hide 3 defaults, add ours
                page.get_by_placeholder("Search columns").fill(col)
                item = page.get_by_role("menuitemcheckbox", name=col, exact=True)
                (item if item.count() else page.get_by_text(col, exact=True).last).click()
            page.keyboard.press("Escape")
            page.wait_for_timeout(1000)
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            return page.get_by_role("row").all_inner_texts()
        finally:
            browser.close()
