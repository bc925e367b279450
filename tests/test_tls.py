"""Optional TLS on the HTTP ingress and gRPC listeners, from certificate and key files."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest

from sidecar.v1 import sidecar_pb2_grpc
from tests.conftest import Running, StartApp, eventually, message
from tests.receiver import Receiver
from tests.test_grpc_ingress import request
from tests.test_store_contract import head_delivery

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a certificate")


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


async def test_http_and_grpc_serve_tls_with_the_configured_certificate(
    start_app: StartApp, cert: tuple[Path, Path]
) -> None:
    crt, key = cert
    s = await start_app(tls_cert_file=str(crt), tls_key_file=str(key))
    context = ssl.create_default_context(cafile=str(crt))
    async with aiohttp.ClientSession() as session:
        url = f"https://127.0.0.1:{s.app.http_port}/webhook"
        async with session.post(url, json=message(), ssl=context) as resp:
            assert resp.status == 200
    credentials = grpc.ssl_channel_credentials(root_certificates=crt.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{s.app.grpc_port}", credentials) as channel:
        answer = await sidecar_pb2_grpc.MessagingServiceStub(channel).SendMessage(request(message_id="m2"))
    assert answer.duplicate is False


def test_tls_needs_both_files(tmp_path: Path) -> None:
    from sidecar.config import ConfigError, load

    with pytest.raises(ConfigError, match="SIDECAR_TLS_KEY_FILE"):
        load(env={"SIDECAR_TLS_CERT_FILE": str(tmp_path)})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=30, check=False
    )


async def test_the_cli_sends_and_tails_over_tls_with_a_ca_file(start_app: StartApp, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    s = await start_app(tls_cert_file=str(crt), tls_key_file=str(key))
    target = f"127.0.0.1:{s.app.grpc_port}"

    sent = await asyncio.to_thread(cli, "send", "--grpc", target, "--tls-ca", str(crt), "--user", "u",
                                   "--conversation", "c1", "--text", "over tls")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    https = f"https://127.0.0.1:{s.app.http_port}/webhook"
    sent = await asyncio.to_thread(cli, "send", "--http", https, "--tls-ca", str(crt), "--user", "u",
                                   "--conversation", "c1", "--text", "over https")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    tailed = await asyncio.to_thread(cli, "tail", "c1", "--grpc", target, "--tls-ca", str(crt), "--after", "0",
                                     "--max-replies", "2")  # fmt: skip
    assert tailed.returncode == 0, tailed.stderr
    assert [json.loads(line)["payload"]["text"] for line in tailed.stdout.splitlines()] == ["over tls", "over https"]
    plain = await asyncio.to_thread(cli, "send", "--grpc", target, "--timeout", "3", "--user", "u",
                                    "--conversation", "c1")  # fmt: skip
    assert plain.returncode == 1  # without --tls the handshake never happens


async def test_the_admin_listener_serves_tls_only_when_asked(start_app: StartApp, cert: tuple[Path, Path]) -> None:
    from sidecar.config import ConfigError, load

    crt, key = cert
    context = ssl.create_default_context(cafile=str(crt))
    plain = await start_app(tls_cert_file=str(crt), tls_key_file=str(key))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{plain.app.admin_port}/healthz") as resp:
            assert resp.status == 200  # the default: probes keep plain HTTP
        secure = await start_app(tls_cert_file=str(crt), tls_key_file=str(key), admin_tls=True,
                                 admin_tokens=("adm",), store=f"sqlite:///{crt.parent}/second.db")  # fmt: skip
        async with session.get(f"https://127.0.0.1:{secure.app.admin_port}/healthz", ssl=context) as resp:
            assert resp.status == 200
    # and sidecar dlq reaches it with the same CA file
    admin = f"https://127.0.0.1:{secure.app.admin_port}"
    listed = await asyncio.to_thread(cli, "dlq", "--admin", admin, "--tls-ca", str(crt), "--token", "adm", "list")
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    with pytest.raises(ConfigError, match="SIDECAR_ADMIN_TLS"):
        load(env={"SIDECAR_ADMIN_TLS": "true"})


async def test_a_tls_failure_towards_the_response_url_says_so(start_app: StartApp, cert: tuple[Path, Path]) -> None:
    # An operator reading a dead letter's error should see "TLS", not "unreachable".
    crt, key = cert
    untrusted = await start_app(tls_cert_file=str(crt), tls_key_file=str(key), store="memory://")  # not trusted
    async with Receiver() as plain:
        cases = {
            "the TLS certificate was not accepted": f"https://127.0.0.1:{untrusted.app.http_port}/replies",
            "the TLS handshake failed": plain.url.replace("http://", "https://"),  # TLS to a plain HTTP port
        }
        for error, url in cases.items():
            s = await start_app(response_url=url, webhook_backoff_initial=60, store="memory://")
            resp = await s.post(message("c1", "m1"))
            assert resp.status == 200

            async def failed(s: Running = s) -> str | None:
                head = await head_delivery(s.app.store, "c1")
                return head.last_error if head is not None and head.attempts else None

            assert await eventually(failed, what="a failed attempt") == error
