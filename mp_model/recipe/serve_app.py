"""``mp serve``'s HTTP application (FastAPI): TEI's ``/predict``, ``/info``, ``/health`` and ``/metrics``.

``create_app(classifier, options)`` builds it; the endpoints, shapes and status codes are described in
``mp_model.recipe.serve``. The request body is read here (not by FastAPI) so that its size is capped before it is
all read and every refusal is one line: ``{"error": "...", "error_type": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import asynccontextmanager
from typing import Any

import fastapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from mp_model.recipe.records import lone_surrogate
from mp_model.recipe.serve import ServeOptions
from mp_model.recipe.serve_batching import Batcher, Classifier, InferenceError, InputTooLong, Job, Knobs, Scores
from mp_model.recipe.serve_metrics import ServeMetrics
from mp_model.recipe.serve_worker import ModelProcess

# A body over the limit is still read (and dropped) up to this size, so that the client gets its 413.
DRAIN_BYTES = 32 * 1024 * 1024
INPUTS_SHAPE = "inputs must be a text, a [text, text_pair] pair, or a list of texts and pairs"


class PredictRequest(BaseModel):
    """TEI's predict request, with Magic Pyramid's speed knobs (strict types: a number is not a text)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    inputs: str | list[str | list[str]] = Field(
        description="a text, a [text, text_pair] pair, or a list of texts, pairs and one-text lists",
        examples=["I like you."],
    )
    raw_scores: bool = Field(False, description="logits instead of softmax probabilities")
    truncate: bool = Field(False, description="cut texts to the model's length instead of answering 413")
    tau: float | None = Field(None, ge=0, le=1, description="exit threshold in [0, 1] (default: the server's --tau)")
    threshold_scale: float | None = Field(None, ge=0, description="pruning scale (default: --threshold-scale)")


class RequestError(Exception):
    """A request answered with ``status`` and a one-line ``message``; ``error_type`` as TEI's."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, " ".join(message.split()), error_type

    def response(self) -> JSONResponse:
        """The error as TEI answers it."""
        return JSONResponse({"error": self.message, "error_type": self.error_type}, status_code=self.status)


def parse_inputs(inputs: str | list[Any], limit: int) -> tuple[list[tuple[str, str | None]], bool]:
    """TEI's ``inputs`` as ``(text, text_pair)`` items, and whether it was a single input (a text, or a list of
    exactly two texts: a pair, as TEI reads it).

    Raises:
        RequestError: 422 for an empty list or text, a text holding a lone surrogate (JSON's ``"\\ud800"``: not
            Unicode text, refused before any tokenising), or an item of another shape; 413 for more than ``limit``
            items.
    """
    single = isinstance(inputs, str) or (len(inputs) == 2 and all(isinstance(item, str) for item in inputs))
    items = [inputs] if single else inputs
    if not items:
        raise RequestError(422, "inputs is an empty list", "validation")
    if len(items) > limit:
        raise RequestError(413, f"inputs holds {len(items)} texts, more than the {limit} a request may", "validation")
    texts: list[tuple[str, str | None]] = []
    for position, item in enumerate(items):
        parts = [item] if isinstance(item, str) else item
        if len(parts) not in (1, 2):
            raise RequestError(422, f"inputs[{position}] must be a text or a [text, text_pair] pair", "validation")
        if not all(part.strip() for part in parts):
            raise RequestError(422, f"inputs[{position}] holds an empty text", "validation")
        for index, part in enumerate(parts):
            if surrogate := lone_surrogate(part):
                where = "inputs" if single else f"inputs[{position}]"
                where += "" if isinstance(item, str) else f"[{index}]"
                message = f"{where} holds a lone surrogate ({surrogate}), which is not valid Unicode text"
                raise RequestError(422, message, "validation")
        texts.append((parts[0], parts[1] if len(parts) == 2 else None))
    return texts, single


def predictions(scores: Scores, labels: list[str], raw: bool) -> list[dict[str, Any]]:
    """TEI's predictions of one text: every label with its probability (its logit if ``raw``), highest first."""
    values = scores.logits
    if not raw:
        exps = [math.exp(value - max(values)) for value in values]
        values = [value / sum(exps) for value in exps]
    pairs = sorted(zip(labels, values, strict=True), key=lambda pair: -pair[1])
    return [{"label": label, "score": value} for label, value in pairs]


def parse_body(body: bytes, limit: int) -> tuple[PredictRequest, list[tuple[str, str | None]], bool]:
    """The validated request in ``body``, its texts and whether it is a single input; a ``RequestError`` (422, or
    413 beyond ``limit`` inputs) otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(422, f"the body is not valid UTF-8 (byte {error.start})", "validation") from None
    try:
        payload = json.loads(text)
    except ValueError as error:
        raise RequestError(422, f"the body is not valid JSON ({error})", "validation") from None
    try:
        request = PredictRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        if first["loc"] and first["loc"][0] == "inputs" and first["type"] != "missing":
            raise RequestError(422, INPUTS_SHAPE, "validation") from None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestError(422, f"{where}: {first['msg']}", "validation") from None
    texts, single = parse_inputs(request.inputs, limit)
    return request, texts, single


class ServerState:
    """What the endpoints share: the classifier, its batcher (started with the app), the metrics and the options."""

    def __init__(self, classifier: Classifier | ModelProcess, options: ServeOptions) -> None:
        self.classifier, self.options = classifier, options
        self.metrics = ServeMetrics(classifier.layers)
        self.batcher: Batcher | None = None

    def start(self) -> None:
        """Start the batcher's worker thread."""
        self.batcher = Batcher(
            self.classifier.forward,
            self.metrics,
            max_batch_tokens=self.options.max_batch_tokens,
            max_batch_requests=self.options.max_batch_requests,
            max_wait=self.options.max_wait_ms / 1000,
        )

    async def read_body(self, request: fastapi.Request) -> bytes:
        """The request's body, up to ``max_body_bytes``; beyond, a 413 once the rest is read and dropped (so that
        a client still sending reads the answer), unless the body passes ``DRAIN_BYTES``: then at once."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = RequestError(413, f"the body has more than the limit of {limit} bytes", "validation")
        if declared.isdigit() and int(declared) > max(limit, DRAIN_BYTES):
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_BYTES:
                break
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_large
        return b"".join(chunks)

    async def predict(self, request: fastapi.Request) -> tuple[Any, list[Scores]]:
        """One ``/predict`` request's TEI answer and its texts' scores; a ``RequestError`` otherwise."""
        parsed, texts, single = parse_body(await self.read_body(request), self.options.max_client_batch_size)
        try:
            encoded = await run_in_threadpool(self.classifier.encode, texts, parsed.truncate)
        except InputTooLong as error:
            raise RequestError(413, str(error), "validation") from None
        except (ValueError, TypeError) as error:
            raise RequestError(422, f"the tokenizer refused the inputs ({error})", "tokenizer") from None
        knobs = Knobs(
            self.options.tau if parsed.tau is None else parsed.tau,
            self.options.threshold_scale if parsed.threshold_scale is None else parsed.threshold_scale,
        )
        jobs = [Job(ids, types, knobs) for ids, types in encoded]
        try:
            self.batcher.submit(jobs)
        except RuntimeError as error:
            raise RequestError(503, str(error), "unhealthy") from None
        try:
            scores = await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        except InferenceError as error:
            raise RequestError(424, str(error), "backend") from None
        answers = [predictions(score, self.classifier.labels, parsed.raw_scores) for score in scores]
        return answers[0] if single else answers, scores

    def info(self) -> dict[str, Any]:
        """``/info``: TEI's fields that apply, and the server's knobs."""
        classifier, options = self.classifier, self.options
        return {
            "model_id": options.model_id,
            "model_dtype": classifier.dtype,
            "model_type": {"classifier": {"id2label": dict(enumerate(classifier.labels))}},
            "max_input_length": classifier.max_length,
            "max_concurrent_requests": options.max_concurrent_requests,
            "max_batch_tokens": options.max_batch_tokens,
            "max_batch_requests": options.max_batch_requests,
            "max_client_batch_size": options.max_client_batch_size,
            "max_wait_ms": options.max_wait_ms,
            "device": str(classifier.device),
            "dense_hf": classifier.dense_hf,
            "model_worker": classifier.worker,
            "layers": classifier.layers,
            "tau": options.tau,
            "threshold_scale": options.threshold_scale,
        }


def create_app(classifier: Classifier | ModelProcess, options: ServeOptions) -> fastapi.FastAPI:
    """The application serving ``classifier`` with ``options``; its batcher runs from startup to shutdown, where it
    finishes every text already queued."""
    state = ServerState(classifier, options)

    @asynccontextmanager
    async def lifespan(_app: fastapi.FastAPI) -> Any:
        state.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.batcher.close)
        classifier.close()

    app = fastapi.FastAPI(
        title="mp serve",
        description="A Magic Pyramid classifier (token pruning and early exit) with TEI's /predict.",
        lifespan=lifespan,
    )
    body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    }

    @app.post("/predict", openapi_extra=body, summary="Classify a text, a pair, or a list of them (TEI's shapes)")
    async def predict(request: fastapi.Request) -> Response:
        start = time.perf_counter()
        if state.metrics.in_flight >= options.max_concurrent_requests:
            state.metrics.answered(429, None)
            limit = options.max_concurrent_requests
            return RequestError(429, f"more than {limit} requests in flight: retry later", "overloaded").response()
        state.metrics.add_in_flight(1)
        try:
            answer, scores = await state.predict(request)
        except RequestError as error:
            state.metrics.answered(error.status, time.perf_counter() - start)
            return error.response()
        finally:
            state.metrics.add_in_flight(-1)
        seconds = time.perf_counter() - start
        state.metrics.answered(200, seconds)
        headers = {"x-mp-exit-layers": ",".join(str(score.exit_layer) for score in scores)}
        return JSONResponse(answer, headers=headers | {"x-inference-time": f"{seconds * 1000:.3f}"})

    @app.get("/info", summary="The model and the server's limits")
    async def info() -> dict[str, Any]:
        return state.info()

    @app.get("/health", summary="200 while the model's worker runs, 503 otherwise")
    async def health() -> Response:
        if state.batcher is not None and state.batcher.alive and classifier.alive:
            return Response(status_code=200)
        return RequestError(503, "the model's worker is not running", "unhealthy").response()

    @app.get("/metrics", summary="Prometheus metrics (text format 0.0.4)", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
