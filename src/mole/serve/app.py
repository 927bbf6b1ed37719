"""The HTTP layer: FastAPI routes over a :class:`~mole.serve.service.Service`, and the uvicorn runner.

Routes: ``POST /v1/generate`` (JSON with base64 PNGs, or one ``image/png`` when the client accepts only that),
``GET /v1/info``, ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is loaded),
``GET /metrics`` (Prometheus) and ``GET /`` (a page to compare base and MoLE for one seed).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mole.serve.schemas import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    MODE_HELP,
    GenerateRequest,
    GenerateResponse,
)
from mole.serve.service import (
    NotReady,
    QueueFull,
    RequestError,
    RequestTimeout,
    Service,
    ServiceSettings,
    ShuttingDown,
    redact,
)

logger = logging.getLogger(__name__)

GENERATE_PATH = "/v1/generate"
#: The largest request body: two prompts of MAX_PROMPT_CHARS (up to 4 bytes a character in UTF-8, 6 escaped) and a
#: few numbers fit many times over; anything bigger is refused (413) before it is read.
MAX_BODY_BYTES = 64 * 1024
#: Seconds the HTTP server waits beyond the service's drain timeout, so that stopped requests get their 503 first.
SHUTDOWN_GRACE = 5.0


class BodyTooLarge(HTTPException):
    """A request body over :data:`MAX_BODY_BYTES` (answered 413)."""

    def __init__(self) -> None:
        super().__init__(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes by their Content-Length before reading them, and stop
    reading a chunked body at ``limit`` bytes (a 100 MB body was read whole before it was refused)."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _error(413, BodyTooLarge().detail)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge  # an HTTPException: FastAPI passes it on to its handler below
            return message

        await self.app(scope, limited, send)


def _error(status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None):
    body: dict[str, Any] = {"message": message}
    if field is not None:
        body["detail"] = [{"loc": ["body", field], "msg": message, "type": "value_error"}]
        body["message"] = f"{field}: {message}"
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


def create_app(service: Service, drain_timeout: float = 30.0) -> FastAPI:
    """The FastAPI application; loading starts with the app's lifespan unless the service is loaded already.

    Args:
        drain_timeout: At shutdown, seconds that accepted requests still get before they are stopped (uvicorn
            has already waited its graceful-shutdown timeout for the open connections by then).
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if service.state == "idle":
            service.start_loading()
        yield
        await service.close(drain_timeout)

    app = FastAPI(
        title="MoLE generation service",
        description="Text-to-image with a base model, its experts, or the full Mixture of Low-rank Experts.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodyLimit)
    metrics = service.metrics

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, str(exc.detail))

    @app.middleware("http")
    async def count_generations(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path != GENERATE_PATH:
            return await call_next(request)
        started = time.perf_counter()
        response = await call_next(request)
        mode = getattr(request.state, "mode", "none")
        metrics.requests.labels(mode=mode, status=str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.latency.labels(mode=mode).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ())]
            errors.append({"loc": loc, "msg": e.get("msg", ""), "type": e.get("type", "")})
        message = "; ".join(f"{'.'.join(x['loc'][1:]) or 'body'}: {x['msg']}" for x in errors)
        return JSONResponse({"message": message, "detail": errors}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("mole.serve").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive and its event loop answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once the model is loaded (readiness); 503 while it loads or after it failed to."""
        body: dict[str, Any] = {"status": service.state}
        if service.ready:
            body["modes"] = list(service.modes)
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """What is loaded and what a request may ask for."""
        return {
            "model": service.description,
            # The registered version actually loaded (models:/mole/7) when `model` is an alias; null otherwise.
            "model_version": getattr(service._loader, "resolved", None),
            "state": service.state,
            "modes": list(service.modes),
            "mode_help": {m: MODE_HELP[m] for m in service.modes},
            "experts": service.experts,
            "gate": service.gate_kind,
            "native_size": service.native_size,
            "limits": {
                "side": [MIN_SIDE, MAX_SIDE, 8], "steps": [1, MAX_STEPS], "guidance": [0.0, MAX_GUIDANCE],
                "num_images": [1, MAX_IMAGES], "seed": [0, MAX_SEED], "clip_tokens": 77,
                "concurrency": service.settings.concurrency, "max_queue": service.settings.max_queue,
                "request_timeout": service.settings.request_timeout,
            },
        }  # fmt: skip

    @app.post(
        GENERATE_PATH,
        response_model=GenerateResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself with `Accept: image/png`."},
            413: {"description": f"A body over {MAX_BODY_BYTES} bytes."},
            422: {"description": "A field out of bounds or of the wrong type (no coercion); `message` names it."},
            429: {"description": "Queue full; retry after `Retry-After` seconds."},
            503: {"description": "The model is not loaded (yet)."},
            504: {"description": "Not finished within the per-request timeout."},
        },
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate ``num_images`` images for one prompt in mode ``base``, ``experts`` or ``mole``."""
        request.state.mode = body.mode or "default"
        try:
            mode, width, height = service.resolve(body)
            request.state.mode = mode
            png = _wants_png(request)
            if png and body.num_images > 1:
                raise RequestError("num_images", "image/png answers one image; accept application/json for more")
            result = await service.submit(body, mode, width, height)
        except RequestError as err:
            return _error(422, err.message, field=err.field)
        except ShuttingDown as err:
            return _error(503, str(err))  # no Retry-After: this process will not come back; another replica may
        except NotReady as err:
            return _error(503, str(err), headers={"Retry-After": "5"})
        except QueueFull as err:
            return _error(429, str(err), headers={"Retry-After": str(err.retry_after)})
        except RequestTimeout as err:
            return _error(504, str(err))
        except Exception as err:  # a broken generation answers 500 and leaves the service up
            logger.exception("generation failed (mode %s)", request.state.mode)
            return _error(500, redact(f"generation failed: {type(err).__name__}: {err}"))
        # Never the prompt in the logs: it is the user's text, not ours to keep.
        logger.info(
            "generated mode=%s %dx%d steps=%d images=%d queue=%.2fs generate=%.2fs",
            mode, width, height, body.steps, len(result.pngs), result.queue_seconds, result.generate_seconds,
        )  # fmt: skip
        headers = {"X-Mole-Mode": mode, "X-Mole-Seed": str(result.seeds[0])}
        if png:
            return Response(result.pngs[0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            mode=mode, width=width, height=height, steps=body.steps, guidance=body.guidance,
            images=[{"seed": s, "png_base64": b} for s, b in zip(result.seeds, result.png_base64(), strict=True)],
            gates=result.gates, queue_seconds=result.queue_seconds, generate_seconds=result.generate_seconds,
        )  # fmt: skip
        return JSONResponse(payload.model_dump(by_alias=True), headers=headers)

    return app


def make_loader(
    model: str,
    experts: Mapping[str, str] | None = None,
    gates: str | os.PathLike[str] | None = None,
    device: str | None = None,
    compile_unet: bool = False,
) -> Callable[[], Any]:
    """A function that loads ``model`` (a diffusers folder, or a registered ``models:/NAME@ALIAS``).

    Checks what can be checked without loading, so that a wrong path fails before the server starts. With
    ``compile_unet`` the loaded UNet is compiled (:mod:`mole.compile`; eager with a warning on CPU).
    """
    if model.startswith(("models:/", "runs:/")):
        if experts or gates:
            raise ValueError(f"{redact(model)} is a registered MoLE model with its own experts and gates; "
                             "drop --experts/--gates")  # fmt: skip

        class LoadRegistered:
            """Resolves an alias to the version it points to now, then loads that version; ``resolved`` says
            which (``/v1/info`` reports it)."""

            resolved: str | None = None

            def moved(self) -> str | None:
                """The version the alias points to now, when that is not the loaded one (see
                :mod:`mole.serve.follow`); None before loading, for a version URI, or when unchanged."""
                from mole.tracking import resolve_version

                if self.resolved is None:
                    return None
                now = resolve_version(model)
                return now if now != self.resolved else None

            def __call__(self) -> Any:
                from mole.tracking import load_registered_pipeline, resolve_version

                self.resolved = resolve_version(model)
                logger.info("%s is %s", redact(model), redact(self.resolved))
                pipe = load_registered_pipeline(self.resolved)
                pipe = pipe.to(device) if device else pipe
                if compile_unet:
                    from mole.compile import compile_unet as compile_

                    compile_(pipe.unet)
                return pipe

        return LoadRegistered()
    from mole.outputs import gates_file, model_folder

    path = model_folder(model)  # or stage 1's output folder
    if gates is not None and not experts:
        raise ValueError("--gates needs the experts they were trained with (--experts NAME=PATH ...)")
    for name, p in (experts or {}).items():
        if not Path(p).exists():
            raise FileNotFoundError(f"expert {name!r}: {p} does not exist")
    if gates is not None:
        gates = gates_file(gates)  # or the gates stage's output folder

    def load_local() -> Any:
        from mole.generate import load_pipeline

        return load_pipeline(path, dict(experts) if experts else None, gates, device=device, compile_unet=compile_unet)

    return load_local


def run_server(
    loader: Callable[[], Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServiceSettings | None = None,
    description: str = "",
    shutdown_timeout: float = 60.0,
    follow_alias: float = 0.0,
) -> int:
    """Serve until SIGINT/SIGTERM; requests in flight are finished first (up to ``shutdown_timeout`` s).

    ``follow_alias`` > 0: every that many seconds, check whether the registry alias served (``models:/NAME@ALIAS``)
    still points to the loaded version; when it moved, stop gracefully (see :mod:`mole.serve.follow`).

    Returns:
        0 after a clean shutdown, 1 when the model failed to load (the server stops at once then, so that an
        orchestrator restarts it and a person sees the error), 75 when the alias moved (restart to load it).
    """
    import uvicorn

    server: uvicorn.Server | None = None
    failed: list[BaseException] = []

    def on_load_error(err: BaseException) -> None:
        failed.append(err)
        if server is not None:
            server.should_exit = True

    service = Service(loader, settings, description=description, on_load_error=on_load_error)
    app = create_app(service, drain_timeout=shutdown_timeout)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE,
        lifespan="on",
    )

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            service.begin_shutdown(shutdown_timeout)  # stopped requests answer 503 before uvicorn cancels them
            await super().shutdown(sockets)

    server = _Server(config)
    moved: list[str] = []
    follower = None
    if follow_alias > 0 and hasattr(loader, "moved"):
        from mole.serve.follow import AliasFollower

        def on_move(version: str) -> None:
            moved.append(version)
            server.should_exit = True

        follower = AliasFollower(loader, follow_alias, on_move).start()  # type: ignore[arg-type]
    logger.info("serving %s on http://%s:%d (page at /, API at /v1/generate, docs at /docs)",
                service.description, host, port)  # fmt: skip
    server.run()
    if follower is not None:
        follower.stop()
    if failed:
        return 1
    if moved:
        from mole.serve.follow import MOVED_EXIT

        return MOVED_EXIT
    return 0
