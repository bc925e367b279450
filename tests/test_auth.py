"""Bearer tokens: one checker for HTTP and gRPC, rotated through a file without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from sidecar.auth import TokenChecker
from tests.conftest import StartApp, message
from tests.test_grpc_ingress import request


def token_file(tmp_path: Path, *tokens: str) -> tuple[Path, TokenChecker]:
    """A mounted token file holding ``tokens``, and a checker reading it."""
    path = tmp_path / "tokens"
    rotate(path, *tokens)
    return path, TokenChecker(file=str(path))


def rotate(path: Path, *tokens: str) -> None:
    path.write_text("# mounted from a Secret\n" + "\n".join(tokens) + "\n")
    # A rotated Secret volume gets a new mtime; make sure it differs even on coarse clocks.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_no_tokens_lets_everyone_through_and_any_token_must_match_exactly() -> None:
    assert TokenChecker().check(None)
    checker = TokenChecker(("alpha", "beta"))
    assert checker.check("Bearer alpha") and checker.check("BEARER beta") and checker.check("bearer  beta ")
    for header in (None, "", "alpha", "Bearer", "Bearer alph", "Bearer alphaa", "Basic alpha", "Bearer gamma"):
        assert not checker.check(header), header


def test_a_token_file_is_reread_when_it_changes_and_kept_when_it_vanishes(tmp_path: Path) -> None:
    path, checker = token_file(tmp_path, "old")
    assert checker.check("Bearer old")
    rotate(path, "new")
    assert checker.check("Bearer new") and not checker.check("Bearer old")
    path.unlink()  # a Secret volume swap: keep the last good tokens
    assert checker.check("Bearer new")


def test_a_token_file_change_that_keeps_its_mtime_is_seen_and_a_bad_one_keeps_the_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, checker = token_file(tmp_path, "old")
    assert checker.check("Bearer old")
    stat = path.stat()
    path.write_text("new-token\n")  # as cp -p or rsync -t: other content, the same mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checker.check("Bearer new-token") and not checker.check("Bearer old")
    path.write_bytes(b"\xffbroken\n")  # not UTF-8: the last good tokens stay, one warning
    for _ in range(3):
        assert checker.check("Bearer new-token")
    assert [r.getMessage() for r in caplog.records].count("token file unreadable, keeping previous tokens") == 1
    path.write_bytes(b"\xef\xbb\xbfbom-token\n")  # a BOM is not part of the first token
    assert checker.check("Bearer bom-token")


async def test_rotating_the_token_file_applies_to_http_and_grpc_without_restart(
    start_app: StartApp, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    rotate(path, "old")
    s = await start_app(auth_tokens_file=str(path))
    assert (await s.post(message("c1", "m1"), token="old")).status == 200
    rotate(path, "new")
    assert (await s.post(message("c1", "m2"), token="old")).status == 401
    assert (await s.post(message("c1", "m3"), token="new")).status == 200
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(message_id="g1"), metadata=(("authorization", "Bearer old"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await s.stub.SendMessage(request(message_id="g2"), metadata=(("authorization", "Bearer new"),))
    assert ok.duplicate is False


async def test_callback_endpoint_has_its_own_tokens(start_app: StartApp) -> None:
    s = await start_app(auth_tokens=("ingress",), callback_tokens=("callback",))
    await s.post(message(), token="ingress")
    reply = {"type": "text", "payload": {"text": "later"}, "conversationId": "c1", "botpressMessageId": "b1"}
    assert (await s.post(reply, token="ingress", path="/bot/replies")).status == 401
    assert (await s.post(reply, token="callback", path="/bot/replies")).status == 200
    assert (await s.post(message(message_id="m9"), token="callback")).status == 401


def test_a_token_file_that_disappears_keeps_the_tokens_and_says_so_once_per_disappearance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, checker = token_file(tmp_path, "kept")
    for _ in range(2):
        path.unlink()
        for _ in range(3):
            assert checker.check("Bearer kept")
        rotate(path, "kept")
        assert checker.check("Bearer kept")
    missing = [r for r in caplog.records if r.getMessage() == "token file missing, keeping previous tokens"]
    assert len(missing) == 2 and all(r.levelname == "WARNING" for r in missing)
