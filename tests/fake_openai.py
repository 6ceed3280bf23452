"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for the AI judge's tests."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions from a script of replies (the last one repeats) and records each request."""

    daemon_threads = True  # a handler still sleeping for the timeout test must not hold up shutdown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[dict] = []
        self.requests: list[dict] = []

    def reply(self, content: str | None = None, status: int = 200, body: str | None = None, **kw) -> None:
        """Queue one reply: a chat completion with `content`, or `status` with a raw `body`; kw: headers, delay_s."""
        if body is None:
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
        self.script.append({"status": status, "body": body, **kw})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(raw)})
        step = self.server.script.pop(0) if len(self.server.script) > 1 else self.server.script[0]
        time.sleep(step.get("delay_s", 0.0))
        try:
            self.send_response(step["status"])
            for name, value in step.get("headers", {}).items():
                self.send_header(name, value)
            body = step["body"].encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (timeout test)
            pass

    def log_message(self, *args) -> None:  # keep test output clean
        pass
