"""An in-process stand-in for the vLLM HTTP API, for client tests that need no model.

It answers ``/v1/completions`` with a canned choice per sample, can fail the first requests with a
chosen status, can delay answers, and records when each request arrived and finished.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeVLLM:
    fail_first: int = 0  # answer the first requests with ``fail_status``
    fail_status: int = 503
    delay_s: float = 0.0
    requests: list[dict] = field(default_factory=list)
    events: list[tuple[str, float, object]] = field(default_factory=list)
    weight_version: str = "default"
    in_flight: int = 0
    max_in_flight: int = 0
    hang_first: int = 0  # the first requests never answer (a hung server), until the client gives up
    refuse_weight_reloads: int = 0  # answer this many weight reloads (/collective_rpc) with HTTP 400

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if len(self.requests) <= self.fail_first:
            return web.json_response({"error": "try again"}, status=self.fail_status)
        if len(self.requests) <= self.fail_first + self.hang_first:
            await asyncio.sleep(3600)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.events.append(("start", time.monotonic(), body.get("seed")))
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        self.events.append(("end", time.monotonic(), body.get("seed")))
        prompt = body["prompt"]
        choices = [{"index": i, "text": f"out{i}", "token_ids": [prompt[-1] + 1, i],
                    "logprobs": {"token_logprobs": [-0.5, -1.5]}, "finish_reason": "length", "stop_reason": None}
                   for i in range(body.get("n", 1))]
        return web.json_response({"choices": choices})

    async def ok(self, request: web.Request) -> web.Response:
        self.events.append((request.path, time.monotonic(), None))
        return web.json_response({"success": True})

    async def reload(self, request: web.Request) -> web.Response:
        if self.refuse_weight_reloads:
            self.refuse_weight_reloads -= 1
            return web.json_response({"error": "weights do not match the model"}, status=400)
        return await self.ok(request)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        self.weight_version = (await request.json())["new_version"]
        return await self.ok(request)

    async def weight_info(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/collective_rpc", self.reload)
        app.router.add_post("/reset_prefix_cache", self.ok)
        app.router.add_post("/update_weight_version", self.update_weight_version)
        app.router.add_get("/health", self.ok)
        app.router.add_get("/weight_info", self.weight_info)
        return app


async def serve(fake: FakeVLLM) -> tuple[web.AppRunner, str]:
    """Start ``fake`` on a free local port; returns the runner (call ``cleanup()``) and base URL."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"
