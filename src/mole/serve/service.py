"""The model behind the HTTP service: loading, three modes on one pipeline, a bounded queue, timeouts, metrics.

Generation is CPU/GPU bound, so it runs in a pool of ``concurrency`` worker threads; the event loop only
counts, validates and answers. A request is accepted while fewer than ``concurrency + max_queue`` are
accepted and unfinished; beyond that it is refused at once (429 with Retry-After), so that a burst can never
pile up more work than the service can finish within its timeouts.

The three modes share one loaded UNet (:func:`mole.inject.set_mole_mode` switches its MoLE layers). Because
the mode is state of the shared layers, :class:`_ModeLease` lets any number of workers run together in one
mode and makes a different mode wait until they are done. Gate recording hooks the shared UNet too, so a
request that records gates runs alone. Each worker has its own pipeline object (own scheduler and tokenizer,
shared modules): the diffusers scheduler keeps per-call state and must not be shared between threads.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import inspect
import io
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mole.layers import RUN_MODES
from mole.security import redact
from mole.serve.schemas import MODE_HELP, GenerateRequest

logger = logging.getLogger(__name__)

#: Modes from the poorest to the richest (:data:`mole.layers.RUN_MODES`); a request without ``mode`` gets the
#: richest the model has.
MODES = RUN_MODES


class RequestError(ValueError):
    """A request the model cannot serve as asked (answered 422); ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotReady(RuntimeError):
    """The model is still loading, or failed to load (answered 503)."""


class ShuttingDown(NotReady):
    """The service is closing: new requests are refused and those not done by the drain timeout are stopped
    (answered 503, as a request that found no model)."""


class QueueFull(RuntimeError):
    """Every worker and queue slot is taken (answered 429 with ``Retry-After``)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class RequestTimeout(TimeoutError):
    """The request did not finish within the per-request timeout (answered 504)."""


class _Cancelled(Exception):
    """Raised inside a worker to stop a generation whose request has timed out or the service is closing."""


@dataclass
class ServiceSettings:
    """How much work the service takes on.

    Attributes:
        concurrency: Generations that run at once (worker threads). 1 on a CPU or one GPU is usually best:
            a second generation only competes for the same cores.
        max_queue: Accepted requests that may wait for a worker; the next one gets 429.
        request_timeout: Seconds from acceptance to answer, waiting included; then 504 and the generation
            stops at its next denoising step.
    """

    concurrency: int = 1
    max_queue: int = 8
    request_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {self.max_queue}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")


class Metrics:
    """The Prometheus metrics of one service, in their own registry (several services can share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mole_requests", "Generation requests answered, by mode and HTTP status.", ["mode", "status"], registry=r
        )
        self.latency = Histogram(
            "mole_request_latency_seconds",
            "Seconds from receiving a generation request to answering it with images (queue + generation).",
            ["mode"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.queue_depth = Gauge("mole_queue_depth", "Accepted requests waiting for a worker.", registry=r)
        self.in_flight = Gauge("mole_requests_in_flight", "Requests being generated now.", registry=r)
        self.images = Counter("mole_images_generated", "Images generated, by mode.", ["mode"], registry=r)
        self.ready = Gauge("mole_model_ready", "1 once the model is loaded and serving.", registry=r)


class _ModeLease:
    """Who may use the shared UNet: any number of workers in one mode, or one alone; first come, first served."""

    def __init__(self, unet: Any, has_layers: bool) -> None:
        self._unet = unet
        self._has_layers = has_layers
        self._cond = threading.Condition()
        self._mode: str | None = None
        self._active = 0
        self._alone = False
        self._next_ticket = 0
        self._serving = 0

    @contextmanager
    def use(self, mode: str, alone: bool) -> Iterator[None]:
        from mole.inject import set_mole_mode

        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(
                lambda: (
                    self._serving == ticket
                    and (self._active == 0 or (not alone and not self._alone and self._mode == mode))
                )
            )
            if self._active == 0:
                if self._has_layers:  # set every time: cheap, and right even if someone else moved the layers
                    set_mole_mode(self._unet, mode)
                self._mode, self._alone = mode, alone
            self._active += 1
            self._serving += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()


@dataclass
class Result:
    """What a worker hands back: PNG files, their seeds, gate values and timings."""

    mode: str
    width: int
    height: int
    pngs: list[bytes]
    seeds: list[int]
    gates: dict[str, Any] | None
    queue_seconds: float
    generate_seconds: float

    def png_base64(self) -> list[str]:
        return [base64.b64encode(p).decode("ascii") for p in self.pngs]


@dataclass(eq=False)  # hashed by identity: jobs live in a set
class _Job:
    request: GenerateRequest
    mode: str
    width: int
    height: int
    created: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Service:
    """One loaded model served to many requests.

    Args:
        loader: Returns the diffusers pipeline (called once, in a background thread, so that the HTTP server
            answers ``/healthz`` while a large model loads).
        settings: Concurrency, queue and timeout.
        description: What was loaded, for logs and ``/v1/info`` (credentials are masked).
        on_load_error: Called with the exception if loading fails (the CLI stops the server).
    """

    def __init__(
        self,
        loader: Callable[[], Any],
        settings: ServiceSettings | None = None,
        description: str = "",
        on_load_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings or ServiceSettings()
        self.description = redact(description)
        self.metrics = Metrics()
        self.state = "idle"  # idle -> loading -> ready | failed
        self.error: str | None = None
        self.pipe: Any = None
        self.modes: tuple[str, ...] = ("base",)
        self.experts: list[str] = []
        self.gate_kind: str | None = None
        self.native_size = 512
        self._loader = loader
        self._on_load_error = on_load_error
        self._executor = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="mole-generate")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._accepted = 0  # accepted and not finished
        self._running = 0
        self._recent_seconds: deque[float] = deque(maxlen=16)  # recent generation times, for Retry-After
        self._closing = False
        self._jobs: set[_Job] = set()
        self._tokenizer: Any = None
        self._lease: _ModeLease | None = None
        self._loaded = threading.Event()

    # --- loading -------------------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load the model in a background thread; ``state`` goes to ``ready`` or ``failed``."""
        self.state = "loading"
        thread = threading.Thread(target=self._load, name="mole-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self._setup(self._loader())
        except BaseException as err:  # a failed load must be reported, whatever it was
            self.state, self.error = "failed", redact(f"{type(err).__name__}: {err}")
            logger.error("loading %s failed: %s", self.description, self.error)
            self._loaded.set()
            if self._on_load_error is not None:
                self._on_load_error(err)
            return
        logger.info("%s loaded in %.1f s; modes %s", self.description, time.perf_counter() - started, self.modes)

    def _setup(self, pipe: Any) -> None:
        from mole.inject import mole_layers

        layers = mole_layers(pipe.unet)
        first = next(iter(layers.values()), None)
        self.experts = list(first.expert_names) if first is not None else []
        self.gate_kind = first.gate if first is not None else None
        if first is None:
            self.modes = ("base",)
        elif any(layer.gate != "none" for layer in layers.values()):
            self.modes = MODES
        else:
            self.modes = ("base", "experts")
        self.native_size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        self._tokenizer = copy.deepcopy(pipe.tokenizer)  # the event loop's own: tokenizers are not thread-safe
        self._lease = _ModeLease(pipe.unet, first is not None)
        self.pipe = pipe
        self.state = "ready"
        self.metrics.ready.set(1)
        self._loaded.set()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (either way); True when ready."""
        self._loaded.wait(timeout)
        return self.ready

    # --- validation ------------------------------------------------------------------------------------------

    def resolve(self, request: GenerateRequest) -> tuple[str, int, int]:
        """The mode, width and height a request will run with.

        Raises:
            NotReady: The model is not loaded.
            RequestError: A mode this model lacks, gates asked outside ``mole``, or a prompt over the text
                encoder's token limit.
        """
        if not self.ready:
            raise NotReady(f"the model is {self.state}" + (f": {self.error}" if self.error else ""))
        mode = request.mode or self.modes[-1]
        if mode not in self.modes:
            raise RequestError(
                "mode",
                f"{mode!r} ({MODE_HELP[mode]}) is not available: this model serves {', '.join(self.modes)}"
                + ("" if self.experts else " (it was loaded without experts and gates)")
                + ("" if "experts" not in self.modes else " (it was loaded without gates)"),
            )
        if request.return_gates and mode != "mole":
            raise RequestError("return_gates", f"gate values exist in mode 'mole' only, not {mode!r}")
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if text:
                limit = int(self._tokenizer.model_max_length)
                count = len(self._tokenizer(text, truncation=False).input_ids)
                if count > limit:
                    raise RequestError(
                        name,
                        f"is {count} CLIP tokens with start and end tokens; the text encoder reads at most {limit}",
                    )
        return mode, request.width or self.native_size, request.height or self.native_size

    # --- the queue ---------------------------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(max(0, self._accepted - self._running))
        self.metrics.in_flight.set(self._running)

    def _observe(self, seconds: float) -> None:
        """Record one generation's duration (the recent ones estimate ``Retry-After``)."""
        with self._lock:
            self._recent_seconds.append(seconds)

    def retry_after(self) -> int:
        """Seconds until the accepted work (running and queued) is likely done, ``concurrency`` at a time.

        The per-request time is the median of the recent generations (1 s before the first): a median, because
        the first generations of a process (lazy initialisation, cold caches) take many times longer and a running
        mean carried that for dozens of requests (a 39 s estimate for a queue that drained in 4).
        """
        with self._lock:
            accepted = self._accepted
            recent = sorted(self._recent_seconds)
        per_request = recent[len(recent) // 2] if recent else 1.0
        return max(1, math.ceil(per_request * accepted / self.settings.concurrency))

    async def submit(self, request: GenerateRequest, mode: str, width: int, height: int) -> Result:
        """Queue a validated request and wait for its images.

        Raises:
            QueueFull: Every worker and queue slot is taken.
            RequestTimeout: No answer within ``request_timeout`` (the generation is stopped).
        """
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        capacity = self.settings.concurrency + self.settings.max_queue
        with self._lock:
            full = self._accepted >= capacity
            if not full:
                self._accepted += 1
                self._update_gauges()
        if full:
            raise QueueFull(self.retry_after())
        job = _Job(request, mode, width, height)
        with self._lock:
            self._jobs.add(job)
        future: Future[Result] = self._executor.submit(self._run, job)
        future.add_done_callback(lambda _f: self._finished(job))
        answer = asyncio.wrap_future(future)
        # After a timeout nobody awaits the answer any more; take its _Cancelled so that asyncio does not log it.
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(answer), self.settings.request_timeout)
        except TimeoutError as err:
            job.cancelled.set()
            future.cancel()
            raise RequestTimeout(
                f"no answer within {self.settings.request_timeout:g} s; the generation was stopped"
            ) from err
        except (_Cancelled, asyncio.CancelledError):
            # Stopped at shutdown, past the drain timeout: by begin_shutdown/close (_Cancelled from the worker, or
            # its future cancelled) or by the server cancelling this task. Either way the client gets a 503, not
            # the server's plain-text 500 and a traceback in the log.
            if self._closing:
                job.cancelled.set()
                raise ShuttingDown("the service shut down before this request finished") from None
            raise

    def _finished(self, job: _Job) -> None:
        with self._lock:
            self._accepted -= 1
            self._update_gauges()
            self._jobs.discard(job)

    def _view(self) -> Any:
        """This worker's pipeline: the shared modules, its own scheduler and tokenizer."""
        view = getattr(self._local, "pipe", None)
        if view is None:
            # Built by hand, not with from_pipe: that casts the (shared) modules to float32 on the way.
            pipe = self.pipe
            components = dict(pipe.components)
            components.update(scheduler=copy.deepcopy(pipe.scheduler), tokenizer=copy.deepcopy(pipe.tokenizer))
            params = inspect.signature(type(pipe).__init__).parameters
            options = {k: pipe.config[k] for k in params if k not in components and k in pipe.config}
            view = type(pipe)(**components, **options)
            view.set_progress_bar_config(disable=True)
            self._local.pipe = view
        return view

    def _run(self, job: _Job) -> Result:
        """In a worker thread: wait for the mode, generate, encode PNGs."""
        from mole.generate import generate

        if job.cancelled.is_set():
            raise _Cancelled
        with self._lock:
            self._running += 1
            self._update_gauges()
        try:
            view = self._view()
            record = job.request.return_gates
            assert self._lease is not None
            with self._lease.use(job.mode, alone=record):
                if job.cancelled.is_set():
                    raise _Cancelled
                started = time.perf_counter()

                def on_step(_step: int) -> None:
                    if job.cancelled.is_set():
                        raise _Cancelled

                req = job.request
                out = generate(
                    view, [req.prompt], negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
                    guidance=req.guidance, width=job.width, height=job.height, num_images=req.num_images,
                    record=record, on_step=on_step,
                )  # fmt: skip
                seconds = time.perf_counter() - started
            pngs = []
            for image in out.images:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                pngs.append(buf.getvalue())
        finally:
            with self._lock:
                self._running -= 1
                self._update_gauges()
        self._observe(seconds)
        self.metrics.images.labels(mode=job.mode).inc(len(pngs))
        gates = None
        if out.gate_trace is not None:
            trace = out.gate_trace
            gates = {"experts": trace.experts, "local": trace.local, "global": trace.global_}
        return Result(
            mode=job.mode, width=job.width, height=job.height, pngs=pngs, seeds=out.seeds, gates=gates,
            queue_seconds=started - job.created, generate_seconds=seconds,
        )  # fmt: skip

    def begin_shutdown(self, drain: float) -> None:
        """Refuse new requests (503) and stop what is still running ``drain`` seconds from now, so that every
        request gets its 503 before the HTTP server gives up on its connections."""
        self._closing = True
        timer = threading.Timer(drain, self._stop_jobs)
        timer.daemon = True
        timer.start()

    def _stop_jobs(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancelled.set()

    async def close(self, timeout: float = 30.0) -> None:
        """Let accepted requests finish (up to ``timeout`` seconds), then stop what is left (answered 503)."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._accepted > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop_jobs()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self.metrics.ready.set(0)
