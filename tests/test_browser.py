"""The browser page in real headless Chromium against a live server, driven over the DevTools protocol.

Plain CDP over a WebSocket (trio-websocket), no extra packages: Chromium prints its DevTools URL
on stderr; the test opens the page as a file with ``?server=ws://127.0.0.1:PORT``, types a prompt,
watches tokens arrive, presses Stop, and checks that every KV block went back to the pool. A page
opened from file:// sends ``Origin: null``, which the server refuses unless allowed: the server
runs with ``allowed_origins=("null",)``, as ``mini-vllm serve --allowed-origins null``. The same
page served by the server at ``/`` connects to its own origin with nothing allowed, and sends
an API key as a WebSocket subprotocol.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest_serving import Reference, build_engine, running_server, wait_blocks_released
from trio_websocket import WebSocketConnection, open_websocket_url

from mini_vllm.actors import open_service
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.transport.server import Server, ServerLimits

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = Path(__file__).resolve().parent.parent / "examples" / "browser" / "index.html"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(120),
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"),
]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


class Cdp:
    """The browser's DevTools WebSocket: commands get their reply by id; events are kept."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, params: dict[str, Any], session: str | None = None) -> Any:
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_message(json.dumps(message))
        while True:
            reply = await self._receive()
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    async def event(self, method: str, session: str) -> dict[str, Any]:
        while True:
            for e in self.events:
                if e.get("method") == method and e.get("sessionId") == session:
                    self.events.remove(e)
                    return e
            await self._receive()

    async def _receive(self) -> dict[str, Any]:
        message = json.loads(await self._ws.get_message())
        if "method" in message:
            self.events.append(message)
        return message


class Page:
    """One tab, spoken to through a flattened CDP session."""

    def __init__(self, cdp: Cdp, session: str) -> None:
        self._cdp = cdp
        self._session = session

    async def evaluate(self, expression: str) -> Any:
        result = await self._cdp.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            self._session,
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, condition: str, value: str = "true", limit_ms: int = 60000) -> Any:
        """Wait in the page (its own timer) until ``condition`` holds; returns ``value``."""
        return await self.evaluate(
            f"""new Promise((resolve, reject) => {{
                const t0 = Date.now();
                (function poll() {{
                    if ({condition}) resolve({value});
                    else if (Date.now() - t0 > {limit_ms}) reject(new Error("timed out waiting for: {condition}"));
                    else setTimeout(poll, 10);
                }})();
            }})"""
        )


@asynccontextmanager
async def chromium_page(url: str, profile: Path) -> AsyncIterator[Page]:
    proc = await trio.lowlevel.open_process(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        err = b""
        marker = b"DevTools listening on "
        while marker not in err or b"\n" not in err.split(marker)[1]:
            chunk = await proc.stderr.receive_some()
            assert chunk, f"chromium exited: {err.decode(errors='replace')}"
            err += chunk
        browser_url = err.split(marker)[1].split(b"\n")[0].decode().strip()
        async with open_websocket_url(browser_url, max_message_size=64 << 20) as ws:
            cdp = Cdp(ws)
            target = await cdp.call("Target.createTarget", {"url": "about:blank"})
            attached = await cdp.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            session = attached["sessionId"]
            await cdp.call("Page.enable", {}, session)
            await cdp.call("Page.navigate", {"url": url}, session)
            await cdp.event("Page.loadEventFired", session)
            yield Page(cdp, session)
    finally:
        proc.kill()
        await proc.wait()


async def test_type_a_prompt_watch_tokens_stream_and_stop(demo_model_dir: Path, tmp_path: Path) -> None:
    reference = Reference(demo_model_dir)
    limits = ServerLimits(allowed_origins=("null",))  # the page's origin, as a file
    async with running_server([build_engine(demo_model_dir)], limits) as (service, server):
        async with chromium_page(f"{PAGE.as_uri()}?server={server.url}", tmp_path / "profile") as page:
            await page.wait_for("document.querySelector('#model option[value=demo]') !== null")

            # A short greedy run: the page shows exactly the text the offline engine produces.
            await page.evaluate(
                """(() => {
                    document.getElementById('prompt').value = 'Hello';
                    document.getElementById('max-tokens').value = '12';
                    document.getElementById('temperature').value = '0';
                    document.getElementById('generate').click();
                })()"""
            )
            await page.wait_for("document.body.dataset.state === 'done'")
            shown = await page.evaluate("document.getElementById('output').textContent")
            status = await page.evaluate("document.getElementById('status').textContent")
            want = reference("Hello", max_tokens=12, temperature=0)
            assert shown == want.text
            assert status.startswith(want.finish_reason)

            # A long one: tokens appear, Stop cancels it, the blocks go back to the pool.
            await page.evaluate(
                """(() => {
                    document.getElementById('prompt').value = 'Once upon a time';
                    document.getElementById('max-tokens').value = '1000';
                    document.getElementById('generate').click();
                })()"""
            )
            await page.wait_for(
                "document.body.dataset.state === 'generating' && document.getElementById('output').textContent.length > 0"
            )
            assert service.statistics().blocks.used_blocks > 0
            await page.evaluate("document.getElementById('stop').click()")
            await page.wait_for("document.body.dataset.state === 'cancelled'")
            status = await page.evaluate("document.getElementById('status').textContent")
            assert status.startswith("cancelled")
            await wait_blocks_released(service)
            assert service.statistics().ingress.cancelled == 1


async def test_the_page_served_at_the_root_connects_to_its_own_server_with_an_api_key(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    reference = Reference(demo_model_dir)
    key = "page key/é+="  # spaces, non-ASCII, base64's characters: the subprotocol token carries any key
    async with open_service([build_engine(demo_model_dir)]) as service, open_task_group() as nursery:
        server = Server(service, api_keys=[key])  # no --allowed-origins: the page is of its own origin
        await nursery.start(server.run, "127.0.0.1", 0)
        async with chromium_page(f"{server.http_url}/", tmp_path / "profile") as page:
            assert await page.evaluate("document.getElementById('server').value") == server.url
            # Without the key the handshake is refused (401); the page says what that may be.
            await page.wait_for("document.getElementById('connection').textContent.includes('API key')")
            assert server.statistics().auth_refused == 1
            await page.evaluate(
                f"""(() => {{
                    document.getElementById('api-key').value = {json.dumps(key)};
                    document.getElementById('connect').click();
                }})()"""
            )
            await page.wait_for("document.querySelector('#model option[value=demo]') !== null")
            await page.evaluate(
                """(() => {
                    document.getElementById('prompt').value = 'Hello';
                    document.getElementById('max-tokens').value = '12';
                    document.getElementById('temperature').value = '0';
                    document.getElementById('generate').click();
                })()"""
            )
            await page.wait_for("document.body.dataset.state === 'done'")
            shown = await page.evaluate("document.getElementById('output').textContent")
            assert shown == reference("Hello", max_tokens=12, temperature=0).text
            stats = server.statistics()
            assert stats.connections_total == 1 and stats.origins_refused == 0
        nursery.cancel_scope.cancel()
