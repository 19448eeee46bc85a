"""A stand-in judge server on 127.0.0.1 that answers OpenAI-style requests with scripted replies.

``CannedJudge(script)``: ``script(prompt, attempt)`` returns ``(status, reply_text)`` or
``("sleep", seconds, reply_text)``; ``attempt`` counts earlier requests with the same prompt. Every
request (path, headers, JSON body) is recorded, and the most requests in flight at once is tracked.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_ID = "canned-judge"


class CannedJudge:
    def __init__(self, script: Callable[[str, int], tuple]):
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.requests if r["prompt"] is not None]

    def __enter__(self) -> CannedJudge:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler_class(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                judge._record(self, None)
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if "messages" in body:
                    prompt = body["messages"][-1]["content"]
                else:
                    prompt = body.get("prompt")
                attempt = judge._record(self, body, prompt)
                with judge._lock:
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    action = judge.script(prompt, attempt)
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = (200, action[2])
                    status, text = action
                    if status != 200:
                        self._send(status, {"error": text})
                    elif "messages" in body:
                        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                    else:
                        self._send(200, {"choices": [{"index": 0, "text": text}]})
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        return Handler

    def _record(self, handler, body, prompt=None) -> int:
        with self._lock:
            key = prompt or handler.path
            attempt = self._attempts[key]
            self._attempts[key] += 1
            self.requests.append({"path": handler.path, "headers": dict(handler.headers), "body": body,
                                  "prompt": prompt})
            return attempt
