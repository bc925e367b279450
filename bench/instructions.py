"""`python -m bench.instructions`: machine instructions per message, counted by
valgrind's callgrind: a figure that does not drift with the host.

Runs `python -m bench.core` under callgrind twice, for COUNT and for 2 x COUNT
timed messages (side by side, one per core), and prints the difference per
message: start-up, imports and the warm-up cancel out. With `--protocol http`
or `grpc`, the whole sidecar (`python -m sidecar serve`) runs under callgrind
instead, fed COUNT and 2 x COUNT messages by the ingest phases' closed loop (64
in flight, 256 conversations, the same message ids every time) over loopback,
then stopped: the server's instructions per message, protocol included. Every thread's user-space
instructions count (the store's commit thread too); the kernel's work (socket
and WAL writes, fsync) does not, nor do cache misses, so it reads the cost of
the Python and C code run per message, not the time it takes. Repeated runs of
the same code agree to within about 0.02 % (the core), 0.5 % (over HTTP) or a
few per cent (over gRPC, whose poller threads spin with the scheduling), where
CPU time moves by 2-5 % (see docs/performance.md): it is the figure for a
change of a few microseconds.

Needs valgrind (Debian's package of that name); not a project dependency. About
a minute with the default count. Compare two commits by running it in a checkout
of each (`git worktree add`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.__main__ import add_store_arguments, free_port, get_json, load, store_url

# Under callgrind Python runs ~50 times slower: generous waits.
_START_TIMEOUT = 600.0
_LOAD_TIMEOUT = 3600.0


def instructions(count: int, args: argparse.Namespace, out_dir: str) -> subprocess.Popen[str]:
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.{count}",
        sys.executable, "-m", "bench.core", "--count", str(count), "--store", args.store, "--sync", args.sync,
    ]  # fmt: skip
    # A fixed hash seed: dict and set layouts, and so the instructions run, repeat exactly.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def collected(p: subprocess.Popen[str]) -> int:
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"bench.instructions: callgrind failed:\n{err[-2000:]}")
    return _count(err, "its output")


def _count(report: str, where: str) -> int:
    """The instruction total callgrind writes as it ends ("Collected : N")."""
    found = re.search(r"Collected : (\d+)", report)
    if found is None:
        raise SystemExit(f"bench.instructions: no count in {where}:\n{report[-2000:]}")
    return int(found.group(1))


def server_instructions(count: int, args: argparse.Namespace, out_dir: str, bare: bool) -> int:
    """Instructions of a whole server process that took ``count`` messages, start to stop:
    the sidecar, or (``bare``) the bare grpc.aio / aiohttp servers of `make bench`."""
    tmp = Path(out_dir)
    name = f"{'bare' if bare else 'sidecar'}-{count}"
    http, grpc_port, admin = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "SIDECAR_HTTP_ADDR": f"127.0.0.1:{http}",
        "SIDECAR_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "SIDECAR_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "SIDECAR_STORE": store_url(args.store, tmp, name),
        "SIDECAR_STORE_SYNC": args.sync,
        "SIDECAR_LOG_LEVEL": "WARNING",
        "SIDECAR_MAX_PENDING_MESSAGES": "1000000",
        "SIDECAR_CHECK_RESPONSE_URL": "false",
    }
    report = tmp / f"callgrind-{name}.log"
    server = ["-m", "bench.baselines", "servers", str(grpc_port), str(http)] if bare else ["-m", "sidecar", "serve"]
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", f"--log-file={report}",
               sys.executable, *server]  # fmt: skip
    with (tmp / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = f"http://127.0.0.1:{admin}/readyz"
        deadline = time.monotonic() + _START_TIMEOUT
        while not _started(tmp / f"{name}.log" if bare else ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench.instructions: {name} did not start; see {tmp}")
            time.sleep(1.0)
        address = f"127.0.0.1:{grpc_port}" if args.protocol == "grpc" else f"http://127.0.0.1:{http}/webhook"
        result = load("counted_ingest", timeout=_LOAD_TIMEOUT, protocol=args.protocol, address=address,
                      count=count, concurrency=64, conversations=256, bare=bare)  # fmt: skip
        if result["errors"]:
            raise SystemExit(f"bench.instructions: {result['errors']} requests failed")
        while not bare and get_json(ready)["details"]["pending_messages"]:  # the bot's work left behind
            time.sleep(2.0)
        proc.terminate()
        proc.wait(_START_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return _count(report.read_text(), str(report))


def _started(probe: Path | str) -> bool:
    """The bare servers print "ready"; the sidecar answers /readyz."""
    if isinstance(probe, Path):
        return probe.exists() and "ready" in probe.read_text()
    try:
        get_json(probe)
    except OSError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    add_store_arguments(parser)
    parser.add_argument(
        "--protocol",
        choices=("core", "http", "grpc"),
        default="core",
        help="core: bench.core, no sockets (default); http, grpc: a whole sidecar fed over loopback",
    )
    parser.add_argument("--count", type=int, default=3000, help="messages of the shorter run (the longer has twice)")
    args = parser.parse_args()  # fmt: skip
    if shutil.which("valgrind") is None:
        print("bench.instructions: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-instructions-") as tmp:
        if args.protocol == "core":
            short, long = instructions(args.count, args, tmp), instructions(2 * args.count, args, tmp)
            per_message = (collected(long) - collected(short)) / args.count
        else:
            runs = [(n, bare) for bare in (True, False) for n in (args.count, 2 * args.count)]
            with ThreadPoolExecutor(len(runs)) as pool:  # four processes: the counts do not mind sharing cores
                b1, b2, s1, s2 = pool.map(lambda run: server_instructions(run[0], args, tmp, run[1]), runs)
            bare_figure, per_message = (b2 - b1) / args.count, (s2 - s1) / args.count
    kind = args.store.split("://")[0] + (f" {args.sync}" if args.store == "sqlite" else "")
    where = "the core" if args.protocol == "core" else f"the sidecar over {args.protocol}"
    print(f"{kind}: {per_message:,.0f} instructions per message through {where} (user space, all threads; callgrind)")
    if args.protocol != "core":
        ratio = per_message / bare_figure
        print(f"bare {args.protocol} server of make bench: {bare_figure:,.0f} per message; the sidecar {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
