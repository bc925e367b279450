"""The `sidecar` command run as a user runs it: a subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sidecar.config import describe


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGS` with a clean SIDECAR_* environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    # Wide help output, so a flag and its variable are never wrapped apart.
    base["COLUMNS"] = "400"
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on: bound by us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def option_entries(help_text: str) -> list[str]:
    """Each option of a --help text on one line: "--flag METAVAR help text joined"."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif line.startswith("      ") and entries:
            entries[-1] += " " + line.strip()
    return entries


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "send", "tail"):
        assert command in result.stdout


def test_no_command_prints_usage_and_exits_2() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage: sidecar" in result.stderr


def test_serve_help_shows_every_setting_with_its_variable_and_default() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    assert "--config FILE" in result.stdout
    entries = option_entries(result.stdout)
    for flag, variable, default, _ in describe():
        entry = next((e for e in entries if e.startswith(flag + " ")), None)
        assert entry is not None, flag
        assert variable in entry
        assert f"default: {default or 'none'}" in entry


def test_serve_help_takes_booleans_as_values_so_they_can_override_the_environment() -> None:
    result = run("serve", "--help")
    assert "--allow-unauthenticated true|false" in result.stdout


def test_send_help_explains_every_flag() -> None:
    result = run("send", "--help")
    assert result.returncode == 0
    for flag in ("--grpc", "--http", "--token", "--user", "--conversation", "--message-id", "--type", "--text"):
        assert flag in result.stdout
    assert "--payload JSON" in result.stdout
    assert "SIDECAR_TOKEN" in result.stdout


def test_tail_help_explains_every_flag() -> None:
    result = run("tail", "--help")
    assert result.returncode == 0
    for flag in ("CONVERSATION", "--after", "--grpc", "--token", "--once", "--max-replies"):
        assert flag in result.stdout


def test_serve_with_an_invalid_environment_setting_exits_2_naming_the_variable() -> None:
    result = run("serve", env={"SIDECAR_BOT": "nope"})
    assert result.returncode == 2
    assert result.stderr.startswith("sidecar: ")
    assert "SIDECAR_BOT" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_an_invalid_flag_value_exits_2_naming_the_flag() -> None:
    result = run("serve", "--bot-timeout", "soon")
    assert result.returncode == 2
    assert "--bot-timeout" in result.stderr


def test_environment_wins_over_the_config_file_and_flags_win_over_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text('bot = "nope"\n', encoding="utf-8")
    # The file's bad bot is overridden by the environment, so the next invalid setting is the one reported.
    result = run("serve", "--config", str(config), "--store-sync", "sometimes", env={"SIDECAR_BOT": "echo"})
    assert result.returncode == 2
    assert "SIDECAR_BOT" not in result.stderr
    assert "store_sync" in result.stderr


def test_a_false_flag_overrides_a_true_variable() -> None:
    env = {"SIDECAR_ALLOW_UNAUTHENTICATED": "true", "SIDECAR_HTTP_ADDR": "0.0.0.0:8080"}
    result = run("serve", "--allow-unauthenticated", "false", env=env)
    assert result.returncode == 2
    assert "SIDECAR_AUTH_TOKENS" in result.stderr


def test_serve_with_an_unreadable_config_file_exits_2(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "--config" in result.stderr


@pytest.mark.parametrize("payload", ["{bad", "NaN", ""])
def test_send_with_a_payload_that_is_not_json_exits_2_with_a_clear_error(payload: str) -> None:
    result = run("send", "--user", "u1", "--conversation", "c1", "--payload", payload)
    assert result.returncode == 2
    assert "--payload is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_needs_user_and_conversation() -> None:
    result = run("send", "--text", "hi")
    assert result.returncode == 2
    assert "--user" in result.stderr


def test_send_takes_grpc_or_http_not_both() -> None:
    result = run("send", "--user", "u", "--conversation", "c", "--grpc", "x:1", "--http", "http://x/webhook")
    assert result.returncode == 2
    assert "not allowed with" in result.stderr


def test_send_refuses_a_url_that_is_not_http() -> None:
    result = run("send", "--user", "u", "--conversation", "c", "--http", "file:///etc/passwd")
    assert result.returncode == 2
    assert "http://" in result.stderr


def test_send_over_grpc_to_nothing_exits_1_with_the_status() -> None:
    result = run("send", "--user", "u", "--conversation", "c", "--grpc", f"127.0.0.1:{closed_port()}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert result.stdout == ""


def test_send_over_http_to_nothing_exits_1_saying_it_cannot_reach_it() -> None:
    url = f"http://127.0.0.1:{closed_port()}/webhook"
    result = run("send", "--user", "u", "--conversation", "c", "--http", url)
    assert result.returncode == 1
    assert f"cannot reach {url}" in result.stderr


def test_tail_once_against_nothing_exits_1() -> None:
    result = run("tail", "c1", "--once", "--grpc", f"127.0.0.1:{closed_port()}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_tail_refuses_a_negative_cursor() -> None:
    result = run("tail", "c1", "--after", "-1")
    assert result.returncode == 2
    assert "--after" in result.stderr


def test_a_setting_found_wrong_only_at_start_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {
        "SIDECAR_BOT": "script",
        "SIDECAR_BOT_SCRIPT": str(tmp_path / "missing.yaml"),
        "SIDECAR_STORE": "memory://",
        "SIDECAR_HTTP_ADDR": "127.0.0.1:0",
        "SIDECAR_GRPC_ADDR": "127.0.0.1:0",
        "SIDECAR_ADMIN_ADDR": "127.0.0.1:0",
    }
    result = run("serve", env=env)
    assert result.returncode == 2
    assert "SIDECAR_BOT_SCRIPT" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("send", "--user", "u", "--conversation", "c", "--timeout", "-1"),
        ("send", "--user", "u", "--conversation", "c", "--timeout", "0"),
        ("send", "--user", "u", "--conversation", "c", "--timeout", "nan"),
        ("send", "--user", "u", "--conversation", "c", "--http", "http://127.0.0.1:abc/webhook"),
        ("send", "--user", "u", "--conversation", "c", "--http", "http://[::1"),
        ("dlq", "--timeout", "-1", "list"),
        ("dlq", "--admin", "http://127.0.0.1:abc", "list"),
        ("dlq", "--admin", "http://[::1", "list"),
        ("dlq", "list", "--limit", "-5"),
        # Each was a traceback (exit 1), or a retry for ever, before:
        ("tail", "c1", "--after", str(2**64)),  # past the proto's uint64
        ("send", "--user", "u", "--conversation", "c", "--payload", "[" * 5000 + "]" * 5000),
        ("tail", "c1", "--token", "tok1\n"),  # grpc: INTERNAL "Invalid metadata", retried by tail
        ("send", "--user", "u", "--conversation", "c", "--token", "tök€"),
        ("dlq", "--token", "a b", "list"),
        # urllib would take "user:s3cr3t@host" for a host name; the password must not be shown.
        ("dlq", "--admin", "http://admin:s3cr3t@127.0.0.1:9", "list"),
        ("dlq", "--admin", "http://127.0.0.1:9/?x=1", "list"),  # the API path would land in the query
        ("send", "--user", "u", "--conversation", "c", "--http", "http://u:s3cr3t@127.0.0.1:9/webhook"),
    ],
)
def test_bad_cli_arguments_are_usage_errors_without_a_traceback(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "s3cr3t" not in result.stderr


def test_a_token_from_the_environment_is_checked_too() -> None:
    result = run("tail", "c1", "--once", env={"SIDECAR_TOKEN": "tok1\n"})
    assert result.returncode == 2 and "--token" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_does_not_follow_redirects_with_its_token() -> None:
    """A 302 to another host would have been followed with the Authorization header (and a
    POST turned into a GET), its answer printed as the sidecar's, exit 0."""
    seen: list[bytes] = []
    with socket.socket() as redirector, socket.socket() as capture:
        for sock in (redirector, capture):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        target = f"http://localhost:{capture.getsockname()[1]}/capture"

        def redirect() -> None:
            conn, _ = redirector.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode())

        def record() -> None:
            capture.settimeout(5)  # long enough for a redirect followed at once
            try:
                conn, _ = capture.accept()
            except TimeoutError:
                return
            with conn:
                seen.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

        threads = [threading.Thread(target=f, daemon=True) for f in (redirect, record)]
        for t in threads:
            t.start()
        result = run("dlq", "--admin", f"http://127.0.0.1:{redirector.getsockname()[1]}", "--token", "ADMIN-SECRET",
                     "list")  # fmt: skip
        for t in threads:
            t.join(10)
    assert result.returncode == 1 and "302" in result.stderr and "redirects are not followed" in result.stderr
    assert not seen


def test_dlq_pointed_at_something_that_is_not_http_exits_1_saying_so() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer_garbage() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"\x00\x00\x12\x04 not http at all\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        result = run("dlq", "--admin", f"http://127.0.0.1:{port}", "list")
        thread.join(5)
    assert result.returncode == 1
    assert "did not answer in HTTP" in result.stderr and "Traceback" not in result.stderr
