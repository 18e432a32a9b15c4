"""/health follows the readiness flag the launcher sets: 503 until the warm-up has run and again
while draining, 200 in between (the routes never touch the model)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from research_rt.server import info


def _health(app) -> int:
    return asyncio.run(info.health(SimpleNamespace(app=app))).status


def test_health_is_503_until_ready_and_while_draining():
    app = SimpleNamespace(ctx=SimpleNamespace())
    assert _health(app) == 200  # an app nobody marks (an in-process test server) is ready
    info.set_ready(app, False)  # launch_server: before the warm-up request
    assert _health(app) == 503
    info.set_ready(app, True)  # warm-up done
    assert _health(app) == 200
    info.set_ready(app, False)  # SIGINT / SIGTERM: draining
    assert _health(app) == 503
