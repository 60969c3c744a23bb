"""A teacher's `GET /health` probe waits long enough for SGLang's generating health check (1-20 s when busy):
a slow but healthy server is healthy, a server slower than the probe's timeout is not."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from megatron_camopd.remote.replicas import HEALTH_TIMEOUT_S
from megatron_camopd.teachers.http import HttpTeacher


def _slow_health_server(delay: float):
    """An aiohttp server on a free loopback port whose /health answers 200 after `delay` seconds."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    async def health(request):
        await asyncio.sleep(delay)
        return web.Response(text="ok")

    async def start():
        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        box["runner"] = runner
        ready.set()

    threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True).start()
    ready.wait(10)

    def stop():
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)

    return box["url"], stop


def test_slow_generating_health_check_is_healthy() -> None:
    assert HEALTH_TIMEOUT_S >= 20.0  # sized for SGLang's one-token generation on a busy server
    url, stop = _slow_health_server(1.5)  # slower than the old 2 x health_interval_s (1 s floor) probe
    try:
        with HttpTeacher("general", [url], health_interval_s=0.1) as t:
            assert t._pool.call(t._pool.health_ok(url)) is True
        with HttpTeacher("general", [url], health_interval_s=0.1, health_timeout_s=0.3) as t:
            assert t._pool.call(t._pool.health_ok(url)) is False
    finally:
        stop()
