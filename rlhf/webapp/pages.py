"""The pages people see: sign in, home, ranking, side by side, guidelines. Rendered on the server; the little
JavaScript that reorders responses and submits labels is in static/app.js."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from rlhf.webapp import tasks
from rlhf.webapp.deps import Reader, WebState, state
from rlhf.webapp.security import (
    COOKIE,
    Evaluator,
    check_csrf,
    close_session,
    evaluator_for_token,
    open_session,
    session_evaluator,
)

router = APIRouter()


def page(web: WebState, template: str, status: int = 200, **context) -> HTMLResponse:
    context.setdefault("who", None)
    context.setdefault("has_guidelines", web.guidelines is not None)
    return HTMLResponse(web.env.get_template(template).render(**context), status_code=status)


async def form_fields(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (already capped in size by BodyLimit)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, max_num_fields=10).items()}


def same_origin(request: Request) -> bool:
    """A browser's POST names the page it came from; a sign-in form posted from another site is refused."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None  # non-browser clients send none; sandboxed or privacy-stripped pages send "null"
    return urlsplit(origin).netloc == request.headers.get("host")


@router.get("/healthz", include_in_schema=False)
def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok")


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:
    return Response(status_code=204)


@router.get("/signin")
def signin_page(request: Request) -> HTMLResponse:
    return page(state(request), "signin.html", title="Sign in", error=None)


@router.post("/signin")
async def signin(request: Request):
    web = state(request)
    web.signin_limiter.check(request.client.host if request.client else "?")
    if not same_origin(request):
        raise HTTPException(403, "sign-in must come from this site's own sign-in page")
    token = (await form_fields(request)).get("token", "").strip()
    name = await run_in_threadpool(evaluator_for_token, web.library, token) if token else None
    if name is None:
        error = "That sign-in link or token is not valid. Ask the admin for a new one."
        return page(web, "signin.html", status=403, title="Sign in", error=error)
    cookie = await run_in_threadpool(open_session, web.library, name, web.cfg.session_hours)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(web.cfg.session_hours * 3600),
        httponly=True,
        samesite="strict",
        secure=web.cfg.secure_cookie,
        path="/",
    )
    return response


@router.post("/signout")
async def signout(request: Request):
    web = state(request)
    who = await run_in_threadpool(session_evaluator, web.library, request.cookies.get(COOKIE))
    if who is not None:
        check_csrf(who, (await form_fields(request)).get("csrf"))
        await run_in_threadpool(close_session, web.library, who)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/")
def home(request: Request, who: Reader) -> HTMLResponse:
    web = state(request)
    progress = tasks.progress(web.library, who.name, web.cfg.overlap, web.cfg.assignment_minutes)
    return page(web, "home.html", title="Home", who=who, progress=progress)


def _task_page(request: Request, who: Evaluator, kind: tasks.Kind) -> HTMLResponse:
    web = state(request)
    cfg = web.cfg
    assignment = web.assign(who.name, kind)
    progress = tasks.progress(web.library, who.name, cfg.overlap, cfg.assignment_minutes)[kind]
    if assignment is None:
        return page(web, "done.html", title="All done", who=who, kind=kind, progress=progress)
    task = tasks.view(web.library, who.name, assignment)
    title = "Rank the responses" if kind == "rank" else "Which answer is better?"
    return page(web, f"{kind}.html", title=title, who=who, task=task, progress=progress)


@router.get("/rank")
def rank_page(request: Request, who: Reader) -> HTMLResponse:
    return _task_page(request, who, "rank")


@router.get("/compare")
def compare_page(request: Request, who: Reader) -> HTMLResponse:
    return _task_page(request, who, "compare")


@router.get("/guidelines")
def guidelines(request: Request, who: Reader) -> HTMLResponse:
    web = state(request)
    return page(web, "guidelines.html", title="Guidelines", who=who, guidelines=web.guidelines)
