"""The liveness endpoint of a process under leader election, standby and leader alike.

kopf's own endpoint starts only with kopf, which a standby does not run; a standby killed for having no
endpoint would never be there to take over. Served on the event loop, so it also answers only while
the loop turns, as kopf's does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp.web


async def serve(port: int, report: Callable[[], dict[str, Any]], host: str = "0.0.0.0") -> aiohttp.web.AppRunner:
    """Answers GET /healthz with 200 and `report()` as JSON until the returned runner is cleaned up."""

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(report())

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get("/healthz", healthz)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, host, port).start()
    return runner
