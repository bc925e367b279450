"""Prometheus metrics (one registry per app, so tests can run several) and log setup."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

import orjson
import prometheus_client.metrics
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from sidecar.errors import SidecarError

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# rejected: the request itself was refused (400, 413, 415; INVALID_ARGUMENT); cancelled:
# the client went away or its deadline passed before the answer; internal: a bug (500).
INGRESS_OUTCOMES = (
    "accepted", "duplicate", "rejected", "unauthenticated", "conflict", "overloaded", "unavailable", "cancelled",
    "internal",
)  # fmt: skip
CALLBACK_OUTCOMES = ("accepted", "rejected", "unauthenticated", "not_found", "unavailable", "cancelled", "internal")
STORE_STAGES = ("message", "delivery", "sweep")


_S = TypeVar("_S")


class _LoopMetric(Generic[_S]):
    """What LoopCounter and LoopHistogram share: label sets resolved to their series,
    and registration in the app's registry as a collector."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _S] = {}

    def labels(self, *values: object) -> _S:
        """The series of one label set, made (empty) on first use: resolve it once and keep it."""
        key = _label_values(self._labelnames, values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new_series()
        return series

    def _new_series(self) -> _S:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [self._family()]


class LoopCounter(_LoopMetric["CounterSeries"]):
    """A counter updated on the event loop's thread only, exported exactly as
    prometheus_client's ``Counter`` would be (``<name>_total`` and ``<name>_created``
    per label set, children in the order ``labels()`` first made them).

    prometheus_client's children take a lock per update and check on every call that
    they may be updated; the per-message metrics are updated ~6 times per message,
    all on the loop, and scraped on the same loop (``generate_latest`` in the admin
    handler), so an update here is one addition. Not for a metric that another thread
    updates: those stay prometheus_client's.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames)
        registry.register(self)

    def _new_series(self) -> CounterSeries:
        return CounterSeries()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        created = _created_samples()
        for values, series in self._series.items():
            family.add_metric(values, series.value, created=series.created if created else None)
        return [family]


class CounterSeries:
    """One label set of a LoopCounter."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LoopHistogram(_LoopMetric["HistogramSeries"]):
    """A histogram updated on the event loop's thread only, exported exactly as
    prometheus_client's ``Histogram`` would be (cumulative ``_bucket`` series with the
    same ``le`` values, ``_count``, ``_sum``, ``_created``); see LoopCounter. An
    observation finds its bucket by bisection. A label-less one has a single series,
    which ``labels()`` returns."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("buckets must be in increasing order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._les = tuple(_go_float(b) for b in bounds)
        if not self._labelnames:  # exported from the start, as prometheus_client does
            self.labels()
        registry.register(self)

    def _new_series(self) -> HistogramSeries:
        return HistogramSeries(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        created = _created_samples()
        for values, series in self._series.items():
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, series.sum)
            if created:
                family.add_sample(
                    self._name + "_created", dict(zip(self._labelnames, values, strict=True)), series.created
                )
        return [family]


class HistogramSeries:
    """One label set of a LoopHistogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound not below the amount: buckets are "less than or equal" (le).
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


def _label_values(names: tuple[str, ...], values: tuple[object, ...]) -> tuple[str, ...]:
    if len(values) != len(names):
        raise ValueError(f"expected {len(names)} label values ({', '.join(names)}), got {len(values)}")
    return tuple(str(v) for v in values)


def _created_samples() -> bool:
    """Whether prometheus_client exports ``_created`` series now (its
    ``PROMETHEUS_DISABLE_CREATED_SERIES`` and ``disable_created_metrics()``): the loop
    metrics follow it, as its own Counter and Histogram do."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


# prometheus_client's own formatting of an ``le`` bound ("0.005", "1.0", "+Inf"); untyped there.
_go_float = cast(Callable[[float], str], floatToGoString)


class Metrics:
    """Every metric the sidecar exports; names are part of the operator's contract."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # Updated with every message, on the loop only (LoopCounter): messages,
        # ingress_latency, bot_calls, bot_latency, replies, end_to_end.
        self.messages = LoopCounter(
            "sidecar_messages_total",
            "Messages received at ingress, by protocol and outcome (" + ", ".join(INGRESS_OUTCOMES) + ")",
            ["protocol", "outcome"],
            registry=r,
        )
        self.ingress_latency = LoopHistogram(
            "sidecar_ingress_seconds",
            "Time from request to answer at ingress, by protocol",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending_messages = Gauge(
            "sidecar_pending_messages", "Messages accepted and not yet handled by the bot", registry=r
        )
        self.pending_bytes = Gauge(
            "sidecar_pending_bytes",
            "Memory the messages accepted and not yet handled by the bot take (estimated from their JSON)",
            registry=r,
        )
        self.bot_calls = LoopCounter(
            "sidecar_bot_calls_total",
            "Bot attempts by bot and outcome (ok, error, timeout, rejected; not_tried: held back by the open breaker)",
            ["bot", "outcome"],
            registry=r,
        )
        self.bot_latency = LoopHistogram(
            "sidecar_bot_seconds", "Duration of one bot attempt", ["bot"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.bot_breaker_open = Gauge(
            "sidecar_bot_breaker_open", "1 while the bot's circuit breaker is open", ["bot"], registry=r
        )
        self.replies = LoopCounter(
            "sidecar_replies_total", "Replies appended to conversation logs, by source", ["source"], registry=r
        )
        self.end_to_end = LoopHistogram(
            "sidecar_message_to_reply_seconds",
            "Time from a message's acceptance to the append of its first reply",
            [],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels()
        self.webhook_attempts = Counter(
            "sidecar_webhook_attempts_total",
            "Webhook POST attempts by outcome (ok, retry, rejected, error, timeout)",
            ["outcome"],
            registry=r,
        )
        self.webhook_latency = Histogram(
            "sidecar_webhook_seconds", "Duration of one webhook POST", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.dead_letters = Counter(
            "sidecar_dead_letters_total", "Items dead-lettered, by kind (reply, message)", ["kind"], registry=r
        )
        self.active_streams = Gauge("sidecar_active_streams", "Open Subscribe streams", registry=r)
        self.streams_refused = Counter(
            "sidecar_streams_refused_total", "Subscribe calls refused because max_streams were open", registry=r
        )
        self.pending_backlog = Gauge(
            "sidecar_pending_backlog",
            "1 while the store holds pending messages not loaded yet (after a restart, a large replay, or"
            " a possibly lost answer): they are loaded oldest first and new messages get 429 meanwhile",
            registry=r,
        )
        self.dead_letters_held = Gauge(
            "sidecar_dead_letters_held", "Dead letters in the store, waiting to be replayed or purged", registry=r
        )
        self.webhook_backlog = Gauge(
            "sidecar_webhook_backlog_conversations",
            "Conversations with replies waiting for webhook delivery (retrying, or not yet tried)",
            registry=r,
        )
        self.stream_cutoffs = Counter(
            "sidecar_stream_cutoffs_total", "Subscribers cut off for falling behind", registry=r
        )
        self.replies_expired = Counter(
            "sidecar_replies_expired_total",
            "Replies trimmed from conversation logs once older than reply_max_age",
            registry=r,
        )
        self.store_errors = Counter(
            "sidecar_store_errors_total",
            "Store steps that failed (the work is retried): stage message (handling one, or loading"
            " pending ones), delivery (the webhook worker), sweep (forgetting and expiring)",
            ["stage"],
            registry=r,
        )
        for stage in STORE_STAGES:  # exported at 0 from the start: a rate() over them needs a first sample
            self.store_errors.labels(stage)
        self.connections_refused = Counter(
            "sidecar_http_connections_refused_total",
            "Connections closed at once because the listener had http_max_connections open",
            ["listener"],
            registry=r,
        )
        self.callbacks = Counter(
            "sidecar_callbacks_total",
            "Requests to POST /bot/replies, by outcome (" + ", ".join(CALLBACK_OUTCOMES) + ")",
            ["outcome"],
            registry=r,
        )
        for outcome in CALLBACK_OUTCOMES:
            self.callbacks.labels(outcome)
        self.messages_forgotten = Counter(
            "sidecar_messages_forgotten_total",
            "Handled messages deleted from the store once older than the dedupe window",
            registry=r,
        )


def ingress_metrics(metrics: Metrics, protocol: str) -> tuple[dict[str, CounterSeries], HistogramSeries]:
    """One protocol's message counters by outcome and its latency histogram, resolved once:
    ``labels()`` builds a tuple of strings and looks it up, too much for every request."""
    counters = {outcome: metrics.messages.labels(protocol, outcome) for outcome in INGRESS_OUTCOMES}
    return counters, metrics.ingress_latency.labels(protocol)


class Throttle:
    """At most one log line per ``interval`` seconds for a condition that recurs with every
    request or batch (a full disk, a store refusing writes): the first is logged at once,
    a flood becomes a line every ``interval``, each saying how many occurrences it stands
    for (those since the previous line). What follows the last line of a flood is not
    logged: the condition's metric counts every occurrence."""

    __slots__ = ("_interval", "_next", "_seen")

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._seen = 0

    def due(self) -> int:
        """Count one occurrence; how many this line stands for, or 0 for no line now."""
        self._seen += 1
        now = time.monotonic()
        if now < self._next:
            return 0
        seen, self._seen, self._next = self._seen, 0, now + self._interval
        return seen


def outcome_of(error: BaseException, allowed: tuple[str, ...]) -> str:
    """The outcome label of a request that ended in ``error``, one of ``allowed``
    (INGRESS_OUTCOMES, CALLBACK_OUTCOMES): "rejected" for what has no label of its own."""
    if isinstance(error, asyncio.CancelledError):
        outcome = "cancelled"
    elif not isinstance(error, SidecarError):
        outcome = "internal"
    else:
        outcome = error.code  # the labels with a code of their own are named after it
    return outcome if outcome in allowed else "rejected"


def describe_error(error: BaseException) -> str:
    """An error for the log: its class and the start of its message."""
    return f"{type(error).__name__}: {error}"[:300]


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields become top-level keys."""

    _STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:
            # A string orjson refuses (lone surrogates: bytes that were not UTF-8, from a
            # header or a setting): escaped by the standard encoder, never a lost line.
            return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Readable lines with the structured fields appended as key=value."""

    _STD = JsonFormatter._STD

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={_field(v)}" for k, v in vars(record).items() if k not in self._STD)
        return f"{line} {extra}" if extra else line


def _field(value: Any) -> str:
    """A field's value for a text line, quoted (JSON) unless it is one plain word: a value
    from a client (a conversation id with a newline in it) must not start a forged line."""
    text = str(value)
    if text and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR, with a traceback whose message
    quotes the offending bytes: the start of an over-long ``Authorization`` header,
    say. Such a record becomes one WARNING line naming the error, without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # RequestPayloadError: a body that cannot be decoded, met again by aiohttp's
        # read of what is left of it after our 400 went out.
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            if isinstance(record.args, tuple) and record.args:  # "Error handling request from %s"
                record.remote = str(record.args[0])
            record.msg, record.args = "malformed HTTP request refused", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.error, record.status = type(exc).__name__, getattr(exc, "code", 400)
        return True


def setup_logging(fmt: str, level: str) -> None:
    """Configure the root logger once, at process start (never at import)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every request at INFO; our metrics cover that.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())
