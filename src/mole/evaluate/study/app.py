"""The rating page of a study and its JSON API (FastAPI), safe to put behind a public link.

- Raters are issued by the server: an opaque random id and a secret token in an ``HttpOnly``, ``SameSite=Strict``
  cookie (only its SHA-256 is stored). Nothing a rater sends names a model: the page knows a pair by an opaque
  assignment token and its images as ``left``/``right``, so neither the URL nor the page source unblinds it.
- Every vote is validated against the database: the assignment must be this rater's and unanswered (403/409),
  every configured question answered and no other (422), each choice ``left``/``right``/``tie`` (422).
- Every text reaches the page as JSON and is set with ``textContent`` by ``study.js``; the Content-Security-Policy
  allows scripts from this origin only (no inline script), so a prompt holding ``<script>`` is shown, not run.
- A token bucket per rater (or per client address before a rater exists) answers 429 with ``Retry-After``; new
  raters are limited per client address, so a script cannot mint raters to stuff the ballot.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mole.evaluate.study.assign import next_pair
from mole.evaluate.study.design import Study
from mole.evaluate.study.store import VoteRefused, VoteStore

logger = logging.getLogger(__name__)

COOKIE = "mole_study_rater"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_STATIC = {"study.js": "text/javascript; charset=utf-8", "study.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class StudySettings:
    """Limits of the study server.

    Attributes:
        requests_per_minute: Sustained requests one rater (or client address) may make; about four per pair.
        burst: Requests allowed at once above the sustained rate (a page load is three).
        new_raters_per_hour: Raters one client address may be issued.
        secure_cookie: Mark the rater cookie ``Secure`` (set behind HTTPS).
    """

    requests_per_minute: float = 240.0
    burst: int = 60
    new_raters_per_hour: int = 30
    secure_cookie: bool = False


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``capacity``; thread-safe."""

    def __init__(self, rate: float, capacity: float, max_keys: int = 100_000) -> None:
        self.rate, self.capacity, self.max_keys = rate, capacity, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a request of ``key`` may go ahead, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                if len(self._buckets) >= self.max_keys and key not in self._buckets:
                    self._buckets.clear()  # bounded memory: forgetting buckets only ever lets a request through
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class VoteBody(BaseModel):
    """The answers to every question of one shown pair."""

    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    answers: dict[str, Literal["left", "right", "tie"]] = Field(max_length=32)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def create_study_app(study: Study, store: VoteStore, settings: StudySettings | None = None) -> FastAPI:
    """The FastAPI app serving ``study`` with votes in ``store``."""
    settings = settings or StudySettings()
    app = FastAPI(title=f"mole study {study.study_id}", docs_url=None, redoc_url=None, openapi_url=None)
    buckets = TokenBuckets(settings.requests_per_minute / 60.0, settings.burst)
    minting = TokenBuckets(settings.new_raters_per_hour / 3600.0, min(settings.new_raters_per_hour, 10))
    pairs = {p.pair: p for p in study.pairs}
    items = {it.item: it for it in study.items}
    questions = [{"key": q.key, "text": q.text} for q in study.questions]

    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    @app.middleware("http")
    async def limit_and_harden(request: Request, call_next: Any) -> Response:
        if request.url.path.startswith("/api/"):
            token = request.cookies.get(COOKIE, "")
            key = ("t:" + token[:64]) if _TOKEN.match(token) else ("ip:" + client(request))
            wait = buckets.take(key)
            if wait > 0:
                return _error(429, "too many requests; slow down", {"Retry-After": str(max(1, math.ceil(wait)))})
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', '')}" for e in exc.errors()
        )
        return _error(422, message)

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        html = resources.files("mole.evaluate.study").joinpath("page.html").read_text(encoding="utf-8")
        return Response(html, media_type="text/html; charset=utf-8")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            return _error(404, "not found")
        text = resources.files("mole.evaluate.study").joinpath(name).read_text(encoding="utf-8")
        return Response(text, media_type=_STATIC[name])

    def rater_of(request: Request) -> str | None:
        token = request.cookies.get(COOKIE)
        return store.rater_of(token) if token and _TOKEN.match(token) else None

    @app.post("/api/next")
    def next_(request: Request) -> Response:
        """The rater's next pair (issuing a rater and its cookie on the first call) and their progress."""
        rater = rater_of(request)
        new_token = None
        if rater is None:
            wait = minting.take(client(request))
            if wait > 0:
                return _error(429, "too many new raters from this address", {"Retry-After": str(math.ceil(wait))})
            rater, new_token = store.new_rater()
            logger.info("new rater %s", rater)
        nxt = next_pair(study, store, rater)
        body: dict[str, Any] = {
            "title": study.title,
            "questions": questions,
            "rater": rater,
            "progress": {"answered": nxt.answered, "total": nxt.total},
            "pair": None,
        }
        if nxt.assignment is not None:
            a = nxt.assignment
            body["pair"] = {
                "token": a.token,
                "prompt": items[pairs[a.pair_id].item].prompt,
                "left": f"/api/image/{a.token}/left",
                "right": f"/api/image/{a.token}/right",
            }
        response = JSONResponse(body)
        if new_token is not None:
            response.set_cookie(
                COOKIE,
                new_token,
                max_age=180 * 86400,
                httponly=True,
                samesite="strict",
                secure=settings.secure_cookie,
                path="/",
            )
        return response

    @app.get("/api/image/{token}/{side}")
    def image(token: str, side: str, request: Request) -> Response:
        """One image of a pair shown to this rater, by side; 404 for anything else (nothing to probe)."""
        rater = rater_of(request)
        if rater is None or side not in ("left", "right") or not _TOKEN.match(token):
            return _error(404, "not found")
        found = store.assignment(rater, token)
        if found is None:
            return _error(404, "not found")
        pair = pairs[found.pair_id]
        model = pair.a if (side == "left") == found.left_is_a else pair.b
        return FileResponse(
            study.image_path(model, pair.item),
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @app.post("/api/vote")
    def vote(body: VoteBody, request: Request) -> Response:
        """Store the answers to every question of one shown pair (all or nothing)."""
        rater = rater_of(request)
        if rater is None:
            return _error(403, "no rater: load the page first")
        found = store.assignment(rater, body.token)
        if found is None:
            return _error(403, "this pair was not shown to you")
        pair = pairs[found.pair_id]
        try:
            stored = store.record(rater, body.token, dict(body.answers), study.question_keys, (pair.a, pair.b))
        except VoteRefused as err:
            return _error(err.status, str(err))
        return JSONResponse({"stored": stored})

    return app


def run_study_server(
    study: Study, store: VoteStore, *, host: str = "127.0.0.1", port: int = 8080, settings: StudySettings | None = None
) -> None:
    """Serve the study until SIGINT/SIGTERM."""
    import uvicorn

    app = create_study_app(study, store, settings)
    logger.info(
        "study %s (%d pairs, %d questions) on http://%s:%d",
        study.study_id,
        len(study.pairs),
        len(study.questions),
        host,
        port,
    )
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)).run()
