"""The per-message metrics (LoopCounter, LoopHistogram) export what prometheus_client's
Counter and Histogram would, and count what a running sidecar did."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability import _LATENCY_BUCKETS, INGRESS_OUTCOMES, LoopCounter, LoopHistogram
from sidecar.v1 import sidecar_pb2
from tests.conftest import StartApp, admin_metrics, eventually, message

# On a bound, below the first, past the last, and between.
AMOUNTS = (0.0, 0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.05, 0.3, 1, 1.0, 2.5, 7, 10, 11, 1e9, math.inf, -1.0)


def both(monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes]:
    """The same updates made to prometheus_client's metrics and to ours, in two
    registries, scraped: the texts must be the same (``_created`` times included,
    with the clock held still)."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    args = ("sidecar_x_total", 'Help with (parentheses), a quote " and a \\ backslash', ["protocol", "outcome"])
    counters = (Counter(*args, registry=theirs), LoopCounter(*args, registry=ours))
    hargs = ("sidecar_x_seconds", "Duration", ["bot"])
    histograms = (
        Histogram(*hargs, buckets=_LATENCY_BUCKETS, registry=theirs),
        LoopHistogram(*hargs, buckets=_LATENCY_BUCKETS, registry=ours),
    )
    plain = (
        Histogram("sidecar_y_seconds", "Plain", buckets=(0.5, 1, 2), registry=theirs),
        LoopHistogram("sidecar_y_seconds", "Plain", [], buckets=(0.5, 1, 2), registry=ours).labels(),
    )
    for counter in counters:
        counter.labels("http", "accepted").inc()
        counter.labels("http", "accepted").inc(2)
        counter.labels("grpc", "accepted")  # at 0
        counter.labels("grpc", "rejected")
        counter.labels("http", "rejected").inc(0.5)
    for histogram in histograms:
        for amount in AMOUNTS:
            histogram.labels("echo").observe(amount)
        histogram.labels("http")  # empty
    for amount in AMOUNTS:
        plain[0].observe(amount)
        plain[1].observe(amount)
    return generate_latest(theirs), generate_latest(ours)


def test_the_loop_metrics_export_what_prometheus_clients_would(monkeypatch: pytest.MonkeyPatch) -> None:
    theirs, ours = both(monkeypatch)
    assert b"sidecar_x_created" in ours and b'le="0.0005"' in ours and b'le="+Inf"' in ours
    assert ours == theirs


def test_without_created_series_neither_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import prometheus_client.metrics

    # The loop metrics read this private flag of prometheus_client's to follow it: a
    # release that renames it must fail here, not leave _created series behind.
    assert isinstance(getattr(prometheus_client.metrics, "_use_created", None), bool)
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)
    theirs, ours = both(monkeypatch)
    assert b"_created" not in ours
    assert ours == theirs


def test_a_name_taken_twice_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    LoopCounter("sidecar_x_total", "x", ["a"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("sidecar_x_total", "x", ["a"], registry=registry)
    with pytest.raises(ValueError, match="expected 1 label value"):
        LoopHistogram("sidecar_y", "y", ["a"], buckets=(1, 2), registry=registry).labels("a", "b")
    with pytest.raises(ValueError, match="non-negative"):
        LoopCounter("sidecar_z_total", "z", [], registry=registry).labels().inc(-1)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_a_scrape_counts_the_messages_the_sidecar_took(start_app: StartApp) -> None:
    """Three messages and a duplicate over HTTP, two over gRPC, all answered by the echo
    bot: the per-message counters and histograms say so on /metrics."""
    s = await start_app()
    for i in range(3):
        assert (await s.post(message(f"c{i}", f"m{i}", f"hi {i}"))).status == 200
    assert (await s.post(message("c0", "m0", "hi 0"))).status == 200  # the duplicate
    for i in range(2):
        request = sidecar_pb2.SendMessageRequest(
            user_id="u1", message_id=f"g{i}", conversation_id=f"g{i}", type="text", text="hey"
        )
        await s.stub.SendMessage(request)
    await eventually(lambda: s.app.core.pending == 0, what="every message handled")
    got = samples(await admin_metrics(s))

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    expected = {("http", "accepted"): 3.0, ("http", "duplicate"): 1.0, ("grpc", "accepted"): 2.0}
    for protocol in ("http", "grpc"):
        for outcome in INGRESS_OUTCOMES:  # every outcome exported, at 0 unless it happened
            count = expected.get((protocol, outcome), 0.0)
            assert value("sidecar_messages_total", protocol=protocol, outcome=outcome) == count, (protocol, outcome)
            assert value("sidecar_messages_created", protocol=protocol, outcome=outcome) > 0
    bounds = [*(str(float(b)) for b in _LATENCY_BUCKETS), "+Inf"]
    histograms = [
        ("sidecar_ingress_seconds", {"protocol": "http"}, 4.0),
        ("sidecar_ingress_seconds", {"protocol": "grpc"}, 2.0),
        ("sidecar_bot_seconds", {"bot": "echo"}, 5.0),
        ("sidecar_message_to_reply_seconds", {}, 5.0),
    ]
    for name, labels, count in histograms:
        buckets = [value(name + "_bucket", **labels, le=le) for le in bounds]
        assert buckets == sorted(buckets) and buckets[-1] == count and buckets[-2] == count, (name, buckets)
        assert value(name + "_count", **labels) == count
        assert 0 < value(name + "_sum", **labels) < count * 10
        assert value(name + "_created", **labels) > 0
    assert value("sidecar_bot_calls_total", bot="echo", outcome="ok") == 5.0
    assert value("sidecar_replies_total", source="bot") == 5.0
    assert not [key for key in got if key[0] == "sidecar_bot_calls_total" and ("outcome", "ok") not in key[1]]
