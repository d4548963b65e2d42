"""Debian's headless Chromium driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`:
JSON messages, NUL-separated, on file descriptors 3 and 4), so a test can lay a page out at a width,
measure its elements, screenshot it and print it to PDF with no package beyond the browser.

The report's CSP allows no script in the page; `Runtime.evaluate` runs in DevTools' own context,
which the page's CSP does not govern, and reads the laid-out DOM.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class Browser:
    """One Chromium with one page, closed on exit."""

    def __init__(self, profile: Path, timeout: float = 60):
        executable = shutil.which("chromium")
        if executable is None:
            raise FileNotFoundError("chromium")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # The browser reads fd 3 and writes fd 4: bash puts our pipe's ends there.
        command = [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser}', "chromium", *command],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.timeout = timeout
        self._buffer = b""
        self._next_id = 0
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self.page("Page.enable")

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """A command's result (events that arrive before it are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.send(method, self.session, **params)

    def wait_for(self, event: str) -> None:
        while self._message().get("method") != event:
            pass

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if not select.select([self._read], [], [], self.timeout)[0]:
                raise TimeoutError(f"chromium said nothing for {self.timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str, width: int, height: int = 900, print_media: bool = False) -> None:
        """Load `url` in a window `width` CSS pixels wide (a phone's 390, a desktop's 1280)."""
        self.page(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        self.page("Emulation.setEmulatedMedia", media="print" if print_media else "screen")
        self.page("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of `expression`, evaluated against the laid-out page."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page, as tall as it is, at the window's width."""
        path.write_bytes(
            base64.b64decode(self.page("Page.captureScreenshot", captureBeyondViewport=True)["data"])
        )

    def pdf(self) -> bytes:
        """The page printed to PDF (A4), as Chromium's print dialog makes it."""
        data = self.page("Page.printToPDF", paperWidth=8.27, paperHeight=11.69, printBackground=True)["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, TimeoutError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
