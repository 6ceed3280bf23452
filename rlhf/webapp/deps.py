"""What every route shares: the app's state, and who is asking (dependencies that refuse with 401/403/429)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import jinja2
from fastapi import Depends, HTTPException, Request
from markupsafe import Markup

from rlhf.config import ServeConfig
from rlhf.store.library import Library
from rlhf.webapp import tasks
from rlhf.webapp.security import COOKIE, Evaluator, RateLimiter, check_csrf, session_evaluator


@dataclass
class WebState:
    """Built once by create_app, read by every request."""

    cfg: ServeConfig
    library: Library
    limiter: RateLimiter  # per evaluator
    signin_limiter: RateLimiter  # per client address
    env: jinja2.Environment
    guidelines: Markup | None  # rendered once, safely (render.markdown_to_html)
    synced_upto: int = 0  # the newest sample id when ranking tasks were last made from the library's samples

    def assign(self, name: str, kind: tasks.Kind) -> int | None:
        """The evaluator's assignment of this kind (tasks.next_task). When none is left and samples were written
        since the last look (`rlhf sample` running beside the app), they become tasks first."""
        cfg = self.cfg
        assignment = tasks.next_task(self.library, name, kind, cfg.overlap, cfg.assignment_minutes)
        if assignment is None and kind == "rank" and self.library.last_sample_id() != self.synced_upto:
            self.synced_upto = self.library.last_sample_id()
            if self.library.sync_rank_tasks():
                assignment = tasks.next_task(self.library, name, kind, cfg.overlap, cfg.assignment_minutes)
        return assignment


class SignInNeeded(Exception):
    """A page asked for without a session: the handler in app.py redirects to /signin."""


def state(request: Request) -> WebState:
    return request.app.state.web


def _who(request: Request) -> Evaluator | None:
    web = state(request)
    who = session_evaluator(web.library, request.cookies.get(COOKIE))
    if who is not None:
        web.limiter.check(who.name)
    return who


def evaluator(request: Request) -> Evaluator:
    """The signed-in evaluator of an API request (401 otherwise); counts against their rate limit."""
    who = _who(request)
    if who is None:
        raise HTTPException(401, "not signed in (or the session expired): open your sign-in link again")
    return who


def page_evaluator(request: Request) -> Evaluator:
    """As `evaluator`, for pages: without a session the browser is sent to the sign-in page."""
    who = _who(request)
    if who is None:
        raise SignInNeeded()
    return who


def changing_evaluator(request: Request, who: Annotated[Evaluator, Depends(evaluator)]) -> Evaluator:
    """The evaluator of a state-changing request, which must carry the session's CSRF token (403 otherwise)."""
    check_csrf(who, request.headers.get("x-csrf-token"))
    return who


def admin(who: Annotated[Evaluator, Depends(page_evaluator)]) -> Evaluator:
    if not who.is_admin:
        raise HTTPException(403, "this page is for admins only")
    return who


# Route parameters: `who: SignedIn` and so on
SignedIn = Annotated[Evaluator, Depends(evaluator)]
Changing = Annotated[Evaluator, Depends(changing_evaluator)]
Reader = Annotated[Evaluator, Depends(page_evaluator)]
Admin = Annotated[Evaluator, Depends(admin)]
