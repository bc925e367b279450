"""`python -m bench [--quick] [--json FILE]`: the sidecar beside bare baselines, in one run, as ratios.

Every server runs in its own process and the load in another, all on
loopback; every phase is bounded in time and every child is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Figure, render
from sidecar import config

_children: list[subprocess.Popen[str]] = []
_PROTOCOL = {"grpc_ingest": "gRPC", "http_ingest": "HTTP"}
_redis_stores: list[str] = []  # forgotten at the end of the run, however it ends


def _kill_all() -> None:
    for p in _children:
        if p.poll() is None:
            p.kill()
            p.wait(10)


atexit.register(_kill_all)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[str]:
    out = log.open("a") if log else subprocess.PIPE
    p = subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        if log else None, text=True,
    )  # fmt: skip
    _children.append(p)
    return p


def wait_line(p: subprocess.Popen[str], word: str, timeout: float = 30) -> None:
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # select before readline: a child that prints nothing must not hang the bench.
        if not select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        line = p.stdout.readline()
        if word in line:
            return
        if not line and p.poll() is not None:
            raise SystemExit(f"bench: a child exited early ({p.args!r})")
    raise SystemExit(f"bench: {p.args!r} not ready in {timeout}s")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # loopback only
        return json.loads(r.read())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("bench: no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, all its threads (grpc's, the store's) included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(figure: str, timeout: float = 300, **args: Any) -> dict[str, Any]:
    """Run one load figure in its own process; its last stdout line is the JSON result."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", figure, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"bench: load {figure} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def store_url(store: str, tmp: Path, name: str) -> str:
    """The SIDECAR_STORE of one sidecar: a fresh SQLite file by default, or a fresh key prefix on Redis."""
    if store == "sqlite":
        return f"sqlite:///{tmp}/{name}.db"
    if store.startswith("redis://"):
        parts = urllib.parse.urlsplit(store)
        query = [*urllib.parse.parse_qsl(parts.query), ("prefix", f"bench-{tmp.name}-{name}:")]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    return store


def forget_redis_keys(url: str) -> None:
    """Delete what a benchmark sidecar wrote under its own prefix, and nothing else."""
    from sidecar.store.redis import RedisStore

    async def drop() -> None:
        store = RedisStore(url, exclusive=False)
        await store.open()
        try:
            await store.drop()
        finally:
            await store.close()

    asyncio.run(drop())


class Sidecar:
    """`python -m sidecar serve` with durable defaults (echo bot, SQLite, synchronous=FULL)."""

    def __init__(self, tmp: Path, name: str, store: str = "sqlite", sync: str = "full", **env: str) -> None:
        self.http, self.grpc, self.admin = free_port(), free_port(), free_port()
        self.env = {
            "SIDECAR_HTTP_ADDR": f"127.0.0.1:{self.http}",
            "SIDECAR_GRPC_ADDR": f"127.0.0.1:{self.grpc}",
            "SIDECAR_ADMIN_ADDR": f"127.0.0.1:{self.admin}",
            "SIDECAR_STORE": store_url(store, tmp, name),
            "SIDECAR_STORE_SYNC": sync,
            "SIDECAR_LOG_LEVEL": "WARNING",
            "SIDECAR_MAX_PENDING_MESSAGES": "1000000",
            "SIDECAR_CHECK_RESPONSE_URL": "false",
            **env,
        }
        if self.env["SIDECAR_STORE"].startswith("redis://"):
            _redis_stores.append(self.env["SIDECAR_STORE"])
        self.proc = spawn(["-m", "sidecar", "serve"], self.env, tmp / f"{name}.log")
        deadline = time.monotonic() + 30
        while True:
            try:
                get_json(f"http://127.0.0.1:{self.admin}/readyz")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: sidecar did not start; see {tmp / (name + '.log')}") from None
                time.sleep(0.1)

    def readyz(self) -> dict[str, Any]:
        details: dict[str, Any] = get_json(f"http://127.0.0.1:{self.admin}/readyz")["details"]
        return details

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """--store and --sync, as every benchmark takes them (see store_url)."""
    parser.add_argument(
        "--store",
        default="sqlite",
        help="the sidecar's store: sqlite (default, a fresh file), memory://, or redis://host:port/db "
        "(a fresh key prefix per run, deleted afterwards)",
    )
    parser.add_argument("--sync", choices=("full", "normal"), default="full", help="SQLite synchronous level")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts and short phases (under a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_store_arguments(parser)
    args = parser.parse_args()
    setup = "SQLite " + args.sync if args.store == "sqlite" else config.redact_url(args.store)
    q = args.quick
    duration = 2.0 if q else 9.0
    rounds = 1 if q else 3  # ingest: alternating baseline/sidecar runs of duration/rounds each
    concurrency = 64
    conversations = 256
    streams = 1000 if q else 10_000
    fan = 200 if q else 1000
    webhook_n = 2000 if q else 10_000
    webhook_conversations = 100

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    figures: list[Figure] = []
    started = time.monotonic()
    try:
        bare_grpc, bare_http = free_port(), free_port()
        bare = spawn(["-m", "bench.baselines", "servers", str(bare_grpc), str(bare_http)])
        wait_line(bare, "ready")
        side = Sidecar(tmp, "ingest", args.store, args.sync)
        bare_target, side_target = f"127.0.0.1:{bare_grpc}", f"127.0.0.1:{side.grpc}"

        def measured(figure: str, pid: int, kw: dict[str, Any], idle: Callable[[], bool]) -> tuple[float, float, int]:
            """One load run: its rate, and the server's CPU seconds and messages, counted
            until what the run left behind (the bot's work) is done."""
            cpu = cpu_seconds(pid)
            result = load(figure, **kw)
            deadline = time.monotonic() + 30
            while not idle() and time.monotonic() < deadline:
                time.sleep(0.01)
            return float(result["rate"]), cpu_seconds(pid) - cpu, int(result["count"])

        def ingest(figure: str, baseline: dict[str, Any], sidecar: dict[str, Any]) -> tuple[float, float]:
            """Medians of ``rounds`` alternating baseline/sidecar runs: a shared machine's
            drift lands on both sides of the ratio instead of on one. Also the servers'
            CPU per message over all rounds, which drifts less with the host's phase."""
            common = {"duration": duration / rounds, "concurrency": concurrency, "conversations": conversations}
            for kw in (baseline, sidecar):
                load(figure, **{**kw, **common, "duration": 1.0})  # warm-up, discarded
            sides = ((bare.pid, {**baseline, **common}, lambda: True),
                     (side.proc.pid, {**sidecar, **common}, lambda: not side.readyz()["pending_messages"]))  # fmt: skip
            runs: list[list[tuple[float, float, int]]] = [[], []]
            for _ in range(rounds):
                for i, (pid, kw, settled) in enumerate(sides):
                    runs[i].append(measured(figure, pid, kw, settled))
            b, s = (statistics.median(rate for rate, _, _ in r) for r in runs)
            cb, cs = (1e6 * sum(cpu for _, cpu, _ in r) / max(1, sum(n for _, _, n in r)) for r in runs)
            figures.append(Figure(f"{_PROTOCOL[figure]} ingest", "msgs/s", b, s, s / b, ">= 0.6", s / b >= 0.6))
            figures.append(Figure("  server CPU per message", "µs", cb, cs, cs / cb, "-", None, higher_is_better=False))
            return b, s

        b, s = ingest("grpc_ingest", {"target": bare_target, "bare": True}, {"target": side_target, "bare": False})
        ingest(
            "http_ingest",
            {"url": f"http://127.0.0.1:{bare_http}/webhook"},
            {"url": f"http://127.0.0.1:{side.http}/webhook"},
        )

        rate = max(10.0, s / 2)
        lat = {"rate": rate, "duration": duration, "conversations": 50}
        lb = load("latency", target=bare_target, bare=True, **lat)
        ls = load("latency", target=side_target, bare=False, **lat)
        ratio = ls["p50_ms"] / lb["p50_ms"]
        figures.append(Figure(f"e2e latency p50 @ {rate:.0f}/s", "ms", lb["p50_ms"], ls["p50_ms"], ratio, "<= 3x",
                              ratio <= 3, higher_is_better=False))  # fmt: skip
        figures.append(Figure("e2e latency p99", "ms", lb["p99_ms"], ls["p99_ms"], ls["p99_ms"] / lb["p99_ms"], "-",
                              None, higher_is_better=False))  # fmt: skip

        def rss_per_stream(pid: int, target: str, bare: bool, settled: Callable[[], bool]) -> float:
            before = rss_kib(pid)
            holder = subprocess.Popen(
                [sys.executable, "-m", "bench.load", "streams",
                 json.dumps({"target": target, "bare": bare, "count": streams, "hold": 5.0})],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            _children.append(holder)
            wait_line(holder, "opened", timeout=120)
            deadline = time.monotonic() + 30
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            added = (rss_kib(pid) - before) / streams
            holder.wait(60)
            return added

        # The bare server's idle stream is grpc.aio's own cost per stream: the floor.
        b = rss_per_stream(bare.pid, bare_target, True, lambda: True)
        s = rss_per_stream(side.proc.pid, side_target, False, lambda: side.readyz().get("streams", 0) >= streams)
        figures.append(Figure(f"RSS per idle stream ({streams})", "KiB", b, s, s / b, "<= 20 KiB", s <= 20,
                              higher_is_better=False))  # fmt: skip
        fo = load("fanout", target=side_target, subscribers=fan, messages=5)
        figures.append(Figure(f"fan-out to {fan} subscribers p50", "ms", None, fo["p50_ms"], None, "-", None,
                              higher_is_better=False))  # fmt: skip
        figures.append(Figure(f"fan-out to {fan} subscribers p99", "ms", None, fo["p99_ms"], None, "-", None,
                              higher_is_better=False))  # fmt: skip
        side.stop()

        # Webhook delivery: fill the outbox while the receiver is down, then let it all flow.
        receiver_port = free_port()
        hook = Sidecar(tmp, "webhook", args.store, args.sync,
                       SIDECAR_RESPONSE_URL=f"http://127.0.0.1:{receiver_port}/replies",
                       SIDECAR_WEBHOOK_BACKOFF_INITIAL="0.05", SIDECAR_WEBHOOK_BACKOFF_MAX="0.2",
                       SIDECAR_WEBHOOK_MAX_ATTEMPTS="1000")  # fmt: skip
        load("send_batch", target=f"127.0.0.1:{hook.grpc}", count=webhook_n, conversations=webhook_conversations,
             concurrency=webhook_conversations)  # fmt: skip
        while hook.readyz()["pending_messages"]:
            time.sleep(0.1)
        receiver = spawn(["-m", "bench.baselines", "receiver", str(receiver_port)])
        wait_line(receiver, "ready")
        stats_url = f"http://127.0.0.1:{receiver_port}/stats"
        deadline = time.monotonic() + 300
        while (stats := get_json(stats_url))["count"] < webhook_n and time.monotonic() < deadline:
            time.sleep(0.1)
        side_rate = stats["count"] / stats["span"]
        order_ok = stats["order_ok"]
        hook.stop()
        urllib.request.urlopen(  # loopback only
            urllib.request.Request(f"http://127.0.0.1:{receiver_port}/reset", method="POST"), timeout=5
        ).read()
        load("webhook_client", url=f"http://127.0.0.1:{receiver_port}/replies", count=webhook_n,
             conversations=webhook_conversations)  # fmt: skip
        base = get_json(stats_url)
        base_rate = base["count"] / base["span"]
        name = "webhook delivery" + ("" if order_ok else " (ORDER BROKEN)")
        ok = side_rate / base_rate >= 0.5 and order_ok
        figures.append(Figure(name, "replies/s", base_rate, side_rate, side_rate / base_rate, ">= 0.5", ok))
    finally:
        _kill_all()
        for url in _redis_stores:
            forget_redis_keys(url)

    machine = f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}"
    print(render(figures, machine, "quick" if q else "full", time.monotonic() - started, setup))
    if args.json:
        Path(args.json).write_text(json.dumps([f.as_dict() for f in figures], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
