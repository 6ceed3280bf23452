"""The annotation web app: `create_app(cfg)` builds it, `rlhf serve` runs it under uvicorn.

Routes: pages (pages.py), the JSON API their JavaScript calls (api.py), the admin dashboard and exports (admin.py),
static CSS/JS under /static. The safety model is in security.py; task assignment and label checks in tasks.py.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from rlhf.config import ServeConfig
from rlhf.store.library import Library
from rlhf.webapp import admin, api, pages
from rlhf.webapp.deps import SignInNeeded, WebState
from rlhf.webapp.render import HERE, environment, read_guidelines
from rlhf.webapp.security import BodyLimit, RateLimiter, SecurityHeaders
from rlhf.webapp.tasks import TaskError


def create_app(cfg: ServeConfig, library: Library | None = None) -> FastAPI:
    library = library or Library(cfg.library)
    app = FastAPI(title="rlhf annotation", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = WebState(
        cfg=cfg,
        library=library,
        limiter=RateLimiter(cfg.rate_limit, cfg.rate_burst),
        signin_limiter=RateLimiter(cfg.rate_limit, cfg.rate_burst),
        env=environment(),
        guidelines=read_guidelines(cfg.guidelines),
    )
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(SecurityHeaders)  # added last, so outermost: even a 413 carries the headers
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, exc: SignInNeeded):
        return RedirectResponse("/signin", status_code=303)

    @app.exception_handler(TaskError)
    async def _task_error(request: Request, exc: TaskError):
        return _error(request, exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(request, 422, f"invalid request: {reasons}")

    return app


def _error(request: Request, status: int, message: str):
    """JSON {"detail": reason} for the API, a page for people."""
    if request.url.path.startswith("/api/") or request.method != "GET":
        return JSONResponse({"detail": message}, status_code=status)
    web: WebState = request.app.state.web
    return pages.page(web, "error.html", status=status, title=f"Error {status}", message=message)
