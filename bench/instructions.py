"""`python -m bench.instructions`: machine instructions per message through the core,
counted by valgrind's callgrind: a figure that does not drift with the host.

Runs `python -m bench.core` under callgrind twice, for COUNT and for 2 x COUNT
timed messages (side by side, one per core), and prints the difference per
message: start-up, imports and the warm-up cancel out. Every thread's user-space
instructions count (the store's commit thread too); the kernel's work (socket
and WAL writes, fsync) does not, nor do cache misses, so it reads the cost of
the Python and C code run per message, not the time it takes. Repeated runs of
the same code agree to within about 0.5 %, where CPU time moves by 2-5 % (see
docs/performance.md): it is the figure for a change of a few microseconds.

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

from bench.__main__ import add_store_arguments


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
    found = re.search(r"Collected : (\d+)", err)
    if p.returncode != 0 or found is None:
        raise SystemExit(f"bench.instructions: callgrind failed:\n{err[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    add_store_arguments(parser)
    parser.add_argument("--count", type=int, default=3000, help="messages of the shorter run (the longer has twice)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("bench.instructions: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-instructions-") as tmp:
        short, long = instructions(args.count, args, tmp), instructions(2 * args.count, args, tmp)
        per_message = (collected(long) - collected(short)) / args.count
    kind = args.store.split("://")[0] + (f" {args.sync}" if args.store == "sqlite" else "")
    print(f"{kind}: {per_message:,.0f} instructions per message (user space, all threads; callgrind)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
