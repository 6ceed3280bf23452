"""Who is asking, and what they may do: sign-in tokens, sessions, CSRF tokens, rate limits, body size, headers.

The safety model (model outputs, prompts and evaluators are all untrusted):
- No default accounts. `rlhf annotators add NAME` makes an evaluator and prints a sign-in token once: 32 random
  bytes from `secrets`. The library keeps only its sha256, and sign-in compares hashes with hmac.compare_digest
  against every evaluator (constant time, no early exit), so a copied database holds no usable credential.
- Signing in opens a session: another random token in an HttpOnly, SameSite=Strict cookie (scripts cannot read it,
  other sites cannot send it), stored as its sha256 in `web_sessions` with an expiry and a per-session CSRF token.
- Every state-changing request must carry that CSRF token (header X-CSRF-Token, or form field `csrf`): 403 without.
- Each evaluator has a token bucket of requests (429 when empty); sign-in attempts have one per client address.
- Request bodies over a limit are refused with 413 from their Content-Length, before anything is read (and a
  body sent without a length is cut off as soon as it passes the limit).
- Every response carries a Content-Security-Policy that allows scripts from this origin's /static files only (no
  inline script, no event-handler attributes), so even a template bug that let markup through would run nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from fastapi import HTTPException
from sqlalchemy import delete, select

from rlhf.store.library import AnnotatorRow, Library, WebSessionRow

COOKIE = "rlhf_session"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # not "no-referrer": browsers would then send "Origin: null"
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- evaluators and their sign-in tokens


def add_evaluator(library: Library, name: str, is_admin: bool = False) -> str:
    """Create a human evaluator and return their sign-in token (shown once; only its hash is stored)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"evaluator name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    token = secrets.token_urlsafe(32)
    with library.write() as s:
        if s.get(AnnotatorRow, name) is not None:
            raise ValueError(f"annotator {name!r} already exists (`rlhf annotators token {name}` gives a new token)")
        s.add(AnnotatorRow(name=name, kind="human", token_hash=hash_token(token), is_admin=is_admin))
    return token


def new_token(library: Library, name: str) -> str:
    """Replace a human evaluator's sign-in token (the old one and every open session stop working)."""
    token = secrets.token_urlsafe(32)
    with library.write() as s:
        row = s.get(AnnotatorRow, name)
        if row is None or row.kind != "human":
            raise ValueError(f"no human evaluator named {name!r} (`rlhf annotators list` shows them)")
        row.token_hash = hash_token(token)
        s.execute(delete(WebSessionRow).where(WebSessionRow.annotator == name))
    return token


def evaluator_for_token(library: Library, token: str) -> str | None:
    """The evaluator whose token this is, comparing against every stored hash in constant time."""
    digest = hash_token(token)
    with library.read() as s:
        rows = s.execute(select(AnnotatorRow.name, AnnotatorRow.token_hash).where(AnnotatorRow.kind == "human"))
        found = None
        for name, stored in rows:
            if stored and hmac.compare_digest(stored, digest):
                found = name  # no early exit: the time taken does not depend on where the match is
        return found


# ---------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Evaluator:
    """The signed-in person behind a request."""

    name: str
    is_admin: bool
    csrf: str
    session_hash: str


def open_session(library: Library, name: str, hours: float) -> str:
    """A new session for the evaluator; returns the cookie value."""
    cookie = secrets.token_urlsafe(32)
    with library.write() as s:
        s.execute(delete(WebSessionRow).where(WebSessionRow.expires_at < now()))  # tidy up expired ones
        s.add(
            WebSessionRow(
                token_hash=hash_token(cookie),
                annotator=name,
                csrf=secrets.token_urlsafe(32),
                expires_at=now() + timedelta(hours=hours),
            )
        )
    return cookie


def session_evaluator(library: Library, cookie: str | None) -> Evaluator | None:
    if not cookie or len(cookie) > 256:
        return None
    digest = hash_token(cookie)
    with library.read() as s:
        row = s.execute(
            select(WebSessionRow, AnnotatorRow.is_admin)
            .join(AnnotatorRow, AnnotatorRow.name == WebSessionRow.annotator)
            .where(WebSessionRow.token_hash == digest)
        ).first()
    if row is None or _aware(row[0].expires_at) < now():
        return None
    return Evaluator(row[0].annotator, bool(row[1]), row[0].csrf, digest)


def close_session(library: Library, evaluator: Evaluator) -> None:
    with library.write() as s:
        s.execute(delete(WebSessionRow).where(WebSessionRow.token_hash == evaluator.session_hash))


def check_csrf(evaluator: Evaluator, sent: str | None) -> None:
    if not sent or not hmac.compare_digest(sent.encode(), evaluator.csrf.encode()):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def _aware(t: datetime) -> datetime:
    """SQLite gives datetimes back without their time zone; they were written in UTC."""
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------- rate limits


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_minute` / 60 per second."""

    def __init__(self, per_minute: float, burst: int):
        self.rate, self.burst = per_minute / 60.0, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last refill)
        self.lock = threading.Lock()  # sync endpoints run in a thread pool

    def allow(self, key: str) -> bool:
        with self.lock:
            t = time.monotonic()
            if len(self.buckets) > 10_000:  # many addresses signing in: forget the buckets that are full again
                full = [k for k, (n, last) in self.buckets.items() if n + (t - last) * self.rate >= self.burst]
                for k in full:
                    del self.buckets[k]
            tokens, last = self.buckets.get(key, (float(self.burst), t))
            tokens = min(float(self.burst), tokens + (t - last) * self.rate)
            allowed = tokens >= 1.0
            self.buckets[key] = (tokens - 1.0 if allowed else tokens, t)
            return allowed

    def check(self, key: str) -> None:
        if not self.allow(key):
            raise HTTPException(429, "too many requests: slow down and try again in a few seconds")


# ---------------------------------------------------------------- ASGI middleware: body size and headers


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class BodyLimit:
    """Refuse bodies over `limit` bytes: by Content-Length before reading, or as soon as a chunked body passes it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _plain(send, 413, f"request body over {self.limit} bytes")
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # FastAPI passes an HTTPException through to its handler: 413
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _plain(send, 413, f"request body over {self.limit} bytes")


class SecurityHeaders:
    """Content-Security-Policy and friends on every response (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _plain(send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + HEADERS})
    await send({"type": "http.response.body", "body": body})
