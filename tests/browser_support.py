"""Headless Chromium for the end-to-end UI test: installing it from Debian when missing, and a small
DevTools-protocol client that loads a page, waits until the rendered DOM shows what a person would
look for, and takes a screenshot of that state."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

from orchestration.processes import finish_process_group, group_alive

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in a container, where the setuid sandbox cannot work
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # small /dev/shm in containers makes tabs crash under load
)
WINDOW = (1400, 1000)
APT_TIMEOUT_SECONDS = 1800  # a cold install pulls ~100 MB of packages; mirrors can be slow


class ChromiumUnavailable(RuntimeError):
    """Chromium is missing and this machine cannot install it (no apt-get, or not root)."""


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    """The path of Debian's chromium, installing it with apt-get when it is missing.

    Fast when it is already installed (a PATH lookup). Raises ChromiumUnavailable when apt-get or
    root is missing, and RuntimeError with apt's output when the install itself fails."""
    found = chromium_binary()
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        raise ChromiumUnavailable("chromium is not installed and installing it needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for a dpkg lock held by someone else's apt rather than failing at once.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends",
               "chromium", "fonts-liberation"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_SECONDS,
                          check=False)
    if done.returncode != 0:
        # Usually stale or missing package lists (a fresh container): refresh them once and retry.
        update = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update"], env=env,
                                capture_output=True, text=True, timeout=APT_TIMEOUT_SECONDS, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True,
                              timeout=APT_TIMEOUT_SECONDS, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"apt-get install chromium failed ({done.returncode}):\n{update.stdout[-2000:]}"
                f"{update.stderr[-2000:]}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
    found = chromium_binary()
    if found is None:
        raise RuntimeError("apt-get installed chromium but no chromium binary is on PATH")
    return found


@dataclass
class PageState:
    """What the page showed when every expected text had appeared (or the wait ran out)."""

    url: str
    text: str  # document.body.innerText: what is rendered, not the markup
    html: str  # document.documentElement.outerHTML, for attributes such as links
    missing: list[str]
    seconds: float


class Chromium:
    """One headless Chromium with a fresh profile, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile_dir: Path, log_path: Path) -> None:
        self.profile_dir = profile_dir
        self._ids = itertools.count(1)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._connection = contextlib.ExitStack()
        self.ws: ClientConnection = self._connection.enter_context(
            connect(self._page_websocket(), max_size=None, open_timeout=60))
        self.call("Emulation.setDeviceMetricsOverride",
                  width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1, mobile=False)

    def _page_websocket(self, timeout: float = 120) -> str:
        """Chromium writes its DevTools port into the profile once it listens; the first page
        target is the about:blank tab it opened."""
        deadline = time.monotonic() + timeout
        active = self.profile_dir / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}; see {self._log.name}")
            if active.exists() and active.read_text().strip():
                port = int(active.read_text().split()[0])
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                        targets = json.load(r)
                except OSError:
                    targets = []
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.5)
        raise TimeoutError(f"chromium did not open its DevTools port within {timeout}s; see {self._log.name}")

    def call(self, method: str, timeout: float = 120, **params) -> dict:
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout}s")
            reply = json.loads(self.ws.recv(timeout=left))
            if reply.get("id") != message_id:
                continue  # an event, or a late answer to an earlier call
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def load(self, url: str, expect: Sequence[str], timeout: float = 240, settle: float = 2.0) -> PageState:
        """Navigate to url and wait until the rendered text contains every string in `expect`
        (the UI fetches its data after the page loads, so 'loaded' means 'shows the data')."""
        self.call("Page.navigate", url=url)
        return self.wait_for(expect, timeout=timeout, settle=settle)

    def wait_for(self, expect: Sequence[str], timeout: float = 240, settle: float = 2.0) -> PageState:
        """Wait, on the page as it is, until its rendered text contains every string in `expect`."""
        started = time.monotonic()
        deadline = started + timeout
        text = ""
        missing = list(expect)
        while time.monotonic() < deadline:
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            missing = [e for e in expect if e not in text]
            if not missing:
                break
            time.sleep(1.0)
        if not missing:
            # Let charts and late tiles finish drawing so the screenshot matches what a person sees.
            time.sleep(settle)
            text = self.evaluate("document.body ? document.body.innerText : ''") or text
        html = self.evaluate("document.documentElement.outerHTML") or ""
        url = self.evaluate("location.href") or ""
        return PageState(url, text, html, missing, time.monotonic() - started)

    def click_text(self, text: str, selector: str = "button, a, [role=tab], [role=button]") -> bool:
        """Click the first element matching selector whose visible text is exactly `text`."""
        script = (
            f"(() => {{ const want = {json.dumps(text)};"
            f" for (const el of document.querySelectorAll({json.dumps(selector)})) {{"
            "   if ((el.innerText || '').trim() === want) { el.click(); return true; } }"
            " return false; })()"
        )
        return bool(self.evaluate(script))

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._connection.close()
        except Exception:  # the browser may already be gone; the process group is killed below
            pass
        stop_process_group(self.process, grace=10)
        self._log.close()


def stop_process_group(process: subprocess.Popen, grace: float = 60, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True and everything it started, by its
    process group id: politely first, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Children (the daemon, the code server, renderers) can outlive their parent: give them a
    # moment to finish their own shutdown, then sweep the group.
    finish_process_group(process.pid, wait_seconds=min(grace, 15))
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
