"""A headless Chromium driven over the DevTools protocol (no extra packages: aiohttp's websocket).

    async with Browser.launch(tmp_path) as browser:
        await browser.goto("http://127.0.0.1:8188")
        value = await browser.evaluate("document.title")
        await browser.screenshot(tmp_path / "page.png")

Chromium is Debian's package (``apt-get install chromium``); a fresh profile per run.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

from nodes_helpers import free_port, stop

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, proc: subprocess.Popen, session: aiohttp.ClientSession, ws) -> None:
        self.proc = proc
        self.session = session
        self.ws = ws
        self._ids = itertools.count(1)
        self.console: list[str] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, workdir: Path, width: int = 1500, height: int = 1000):
        exe = chromium_path()
        if exe is None:
            raise BrowserError("chromium is not installed")
        port = free_port()
        log = open(workdir / "chromium.log", "wb")
        proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={workdir / 'chromium-profile'}", f"--remote-debugging-port={port}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        session = aiohttp.ClientSession()
        try:
            target = await cls._page_target(session, port, proc)
            ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
            browser = cls(proc, session, ws)
            await browser.send("Page.enable")
            await browser.send("Runtime.enable")
            await browser.send("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            yield browser
        finally:
            await session.close()
            stop(proc)
            log.close()

    @staticmethod
    async def _page_target(session: aiohttp.ClientSession, port: int, proc: subprocess.Popen) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrowserError(f"chromium exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    pages = [t for t in await resp.json() if t.get("type") == "page"]
                    if pages:
                        return pages[0]
            await asyncio.sleep(0.2)
        raise BrowserError("chromium's DevTools endpoint did not come up")

    async def send(self, method: str, params: dict | None = None, timeout_s: float = 60.0) -> dict:
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = await self.ws.receive(timeout=max(deadline - time.monotonic(), 0.1))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"DevTools connection closed ({msg.type})")
            data = json.loads(msg.data)
            if data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"]["exceptionDetails"])[:500])
            if data.get("id") == msg_id:
                if "error" in data:
                    raise BrowserError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def evaluate(self, expression: str, timeout_s: float = 60.0):
        result = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True}, timeout_s)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}...: {json.dumps(result['exceptionDetails'])[:800]}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60.0, poll_s: float = 0.25):
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for: {expression}\nconsole: {self.console[-10:]}")
            await asyncio.sleep(poll_s)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(data["data"]))
        return path
