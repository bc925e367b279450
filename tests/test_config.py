"""Configuration: precedence of sources, validation that names the setting, the loopback rule."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import Config, ConfigError, load, redact_url, validate
from sidecar.observability import CALLBACK_OUTCOMES, INGRESS_OUTCOMES, STORE_STAGES, Metrics


def test_defaults_match_the_spec() -> None:
    c = load(env={})
    assert c.http_addr == "127.0.0.1:8080"
    assert c.grpc_addr == "127.0.0.1:50051"
    assert c.admin_addr == "0.0.0.0:9090"
    assert c.auth_tokens == ()
    assert c.response_url == ""
    assert c.bot == "echo" and c.bot_format == "json"
    assert c.store == "sqlite:///./data/sidecar.db"


def test_toml_then_environment_then_flags_later_wins(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text('bot = "script"\nbot_script = "a.yaml"\nmax_id_length = 100\nauth_tokens = ["t1", "t2"]\n')
    c = load(toml_path=str(toml), env={"SIDECAR_MAX_ID_LENGTH": "50", "SIDECAR_BOT": "echo"}, flags={"bot": "script"})
    assert c.bot == "script"
    assert c.max_id_length == 50
    assert c.auth_tokens == ("t1", "t2")


def test_every_setting_has_an_environment_variable() -> None:
    env = {config.env_name(f.name): "" for f in fields(Config)}
    assert "SIDECAR_RESPONSE_AUTHORIZATION" in env and "SIDECAR_CALLBACK_TOKENS" in env
    assert "SIDECAR_BOT_URL" in env and "SIDECAR_BOT_TOKEN" in env and "SIDECAR_WEBHOOK_SECRET" in env


def test_comma_separated_tokens_are_split_and_trimmed() -> None:
    c = load(env={"SIDECAR_AUTH_TOKENS": " a, b ,,c"})
    assert c.auth_tokens == ("a", "b", "c")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SIDECAR_BOT": "nope"}, "SIDECAR_BOT"),
        ({"SIDECAR_HTTP_ADDR": "nonsense"}, "SIDECAR_HTTP_ADDR"),
        ({"SIDECAR_MAX_BODY_BYTES": "lots"}, "SIDECAR_MAX_BODY_BYTES"),
        ({"SIDECAR_MAX_BODY_BYTES": "0"}, "SIDECAR_MAX_BODY_BYTES"),
        ({"SIDECAR_STORE": "mysql://x"}, "SIDECAR_STORE"),
        ({"SIDECAR_WEBHOOK_SECRET": "plain"}, "SIDECAR_WEBHOOK_SECRET"),
        ({"SIDECAR_RESPONSE_URL": "ftp://x"}, "SIDECAR_RESPONSE_URL"),
        ({"SIDECAR_RESPONSE_URL": "http://[::1"}, "SIDECAR_RESPONSE_URL"),
        ({"SIDECAR_RESPONSE_URL": "http://127.0.0.1:99999/hook"}, "SIDECAR_RESPONSE_URL"),
        ({"SIDECAR_RESPONSE_URL": "http://:8080/hook"}, "SIDECAR_RESPONSE_URL"),
        ({"SIDECAR_BOT": "http", "SIDECAR_BOT_URL": "http://bot:port/"}, "SIDECAR_BOT_URL"),
        ({"SIDECAR_STORE": "redis://[bad/0"}, "SIDECAR_STORE"),
        ({"SIDECAR_STORE": "redis://localhost:70000/0"}, "SIDECAR_STORE"),
        ({"SIDECAR_MAX_BODY_BYTES": "3000000000"}, "SIDECAR_MAX_BODY_BYTES"),  # beyond a C int: grpc would crash
        ({"SIDECAR_MAX_PENDING_MESSAGES": "99999999999999999999"}, "SIDECAR_MAX_PENDING_MESSAGES"),
        (
            {"SIDECAR_RESPONSE_URL": "http://r/x", "SIDECAR_RESPONSE_AUTHORIZATION": "Bearer x\n"},
            "SIDECAR_RESPONSE_AUTHORIZATION",
        ),  # a Secret made from a file, with its newline
        ({"SIDECAR_BOT": "http", "SIDECAR_BOT_URL": "http://b/x", "SIDECAR_BOT_TOKEN": "t\r\n"}, "SIDECAR_BOT_TOKEN"),
        ({"SIDECAR_AUTH_TOKENS": "a,b c"}, "SIDECAR_AUTH_TOKENS"),
        ({"SIDECAR_BOT": "http"}, "SIDECAR_BOT_URL"),
        ({"SIDECAR_ALLOW_UNAUTHENTICATED": "maybe"}, "SIDECAR_ALLOW_UNAUTHENTICATED"),
        ({"SIDECAR_BOT_TIMEOUT": "nan"}, "SIDECAR_BOT_TIMEOUT"),
        ({"SIDECAR_DRAIN_TIMEOUT": "inf"}, "SIDECAR_DRAIN_TIMEOUT"),
        ({"SIDECAR_WEBHOOK_RETRY_AFTER_MAX": "-1"}, "SIDECAR_WEBHOOK_RETRY_AFTER_MAX"),
        ({"SIDECAR_DRAIN_TIMEOUT": "-1"}, "SIDECAR_DRAIN_TIMEOUT"),
        # Accepted before, each opening another file or database than the one named:
        ({"SIDECAR_STORE": "sqlite://relative.db"}, "SIDECAR_STORE"),  # was "elative.db"
        ({"SIDECAR_STORE": "sqlite:data.db"}, "SIDECAR_STORE"),
        ({"SIDECAR_STORE": "sqlite://localhost/x.db"}, "SIDECAR_STORE"),
        ({"SIDECAR_STORE": "redis://127.0.0.1:6379/5x"}, "SIDECAR_STORE"),  # was database 0
        # ... or crashing with a traceback when the route was added:
        ({"SIDECAR_WEBHOOK_PATH": "/bot/replies"}, "SIDECAR_WEBHOOK_PATH"),
        ({"SIDECAR_WEBHOOK_PATH": "/a{b"}, "SIDECAR_WEBHOOK_PATH"),
        ({"SIDECAR_WEBHOOK_PATH": "/{x}"}, "SIDECAR_WEBHOOK_PATH"),  # a pattern, not a path
        ({"SIDECAR_WEBHOOK_PATH": "/hook?x=1"}, "SIDECAR_WEBHOOK_PATH"),
        ({"SIDECAR_WEBHOOK_PATH": "/in%20box"}, "SIDECAR_WEBHOOK_PATH"),  # matched decoded: never reached
        # ... or unusable later: a host with a space, a secret path clients resolve away.
        ({"SIDECAR_RESPONSE_URL": "http://127.0.0.1 :8080/replies"}, "SIDECAR_RESPONSE_URL"),
        ({"SIDECAR_CALLBACK_SECRET_PATH": ".."}, "SIDECAR_CALLBACK_SECRET_PATH"),
    ],
)
def test_invalid_settings_fail_with_a_message_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(env=env)


@pytest.mark.parametrize(
    "env",
    [{"SIDECAR_STORE": "sqlite:////abs/x.db"}, {"SIDECAR_STORE": "redis://h:1"}, {"SIDECAR_STORE": "redis://h:1/"},
     {"SIDECAR_STORE": "redis://h:1/3?prefix=a:"}, {"SIDECAR_WEBHOOK_PATH": "/"},
     {"SIDECAR_WEBHOOK_PATH": "/api/v1/messaging/"}, {"SIDECAR_WEBHOOK_PATH": "/hooks/bp:main@v2"}],
)  # fmt: skip
def test_store_urls_and_paths_of_every_documented_form_are_taken(env: dict[str, str]) -> None:
    load(env=env)


def test_unknown_toml_setting_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("no_such_thing = 1\n")
    with pytest.raises(ConfigError, match="no_such_thing"):
        load(toml_path=str(toml), env={})


@pytest.mark.parametrize("name", ["SIDECAR_HTTP_ADDR", "SIDECAR_GRPC_ADDR"])
def test_binding_beyond_loopback_without_tokens_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load(env={name: "0.0.0.0:1234"})


def test_binding_beyond_loopback_is_allowed_with_tokens_or_explicit_opt_in(tmp_path: Path) -> None:
    load(env={"SIDECAR_HTTP_ADDR": "0.0.0.0:1234", "SIDECAR_AUTH_TOKENS": "t"})
    load(env={"SIDECAR_GRPC_ADDR": "[::]:1234", "SIDECAR_ALLOW_UNAUTHENTICATED": "true"})
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated by Kubernetes\ntok\n")
    load(env={"SIDECAR_HTTP_ADDR": "0.0.0.0:1234", "SIDECAR_AUTH_TOKENS_FILE": str(tokens)})


def test_loopback_addresses_are_recognised() -> None:
    assert config.is_loopback("127.0.0.1") and config.is_loopback("::1") and config.is_loopback("localhost")
    assert not config.is_loopback("0.0.0.0") and not config.is_loopback("10.0.0.1")


def test_redacted_settings_hide_secrets() -> None:
    c = load(env={"SIDECAR_AUTH_TOKENS": "topsecret", "SIDECAR_WEBHOOK_SECRET": "whsec_dGVzdA=="})
    shown = str(c.redacted())
    assert "topsecret" not in shown and "dGVzdA" not in shown


def test_configuration_doc_lists_every_setting() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for flag, variable, _, _ in config.describe():
        assert variable in doc, f"{variable} missing from docs/configuration.md"
        assert flag in doc


def test_observability_doc_lists_every_metric_and_label() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, f"{name} missing from docs/observability.md"
    for outcome in (*INGRESS_OUTCOMES, *CALLBACK_OUTCOMES, *STORE_STAGES):
        assert f"`{outcome}`" in doc, f"label value {outcome} missing from docs/observability.md"


def test_create_store_returns_a_redis_store_for_a_redis_url_without_io() -> None:
    from sidecar.store import create_store
    from sidecar.store.redis import RedisStore

    # Port 1 on loopback answers nothing: constructing must not try to connect.
    config = replace(Config(), store="redis://:hunter2@127.0.0.1:1/3?prefix=t1:", reply_retention=7)
    validate(config)
    store = create_store(config)
    assert isinstance(store, RedisStore)
    assert store.prefix == "t1:"
    assert "hunter2" not in repr(store)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0?password=hunter2", "redis://127.0.0.1:6379/0?password=***"),
        ("redis://u:pa/ss@host:1/0", "redis://u:***@host:1/0"),  # an unencoded "/" in the password
        ("redis://u:p@ss#w@host/0?prefix=a:", "redis://u:***@host/0?prefix=a:"),
        ("https://bot.example/x?token=abc&x=1", "https://bot.example/x?token=***&x=1"),
        ("https://TOKEN@bot.example/x", "https://***@bot.example/x"),
        ("https://fn.azurewebsites.net/api/hook?code=abc", "https://fn.azurewebsites.net/api/hook?code=***"),
        ("sqlite:///./data/sidecar.db", "sqlite:///./data/sidecar.db"),
    ],
)
def test_urls_are_logged_without_anything_that_may_be_a_credential(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_credentials_in_a_url_and_an_authorization_setting_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="SIDECAR_RESPONSE_AUTHORIZATION"):
        load(env={"SIDECAR_RESPONSE_URL": "https://u:p@example.com/r", "SIDECAR_RESPONSE_AUTHORIZATION": "Bearer x"})
    with pytest.raises(ConfigError, match="SIDECAR_BOT_TOKEN"):
        load(env={"SIDECAR_BOT": "http", "SIDECAR_BOT_URL": "https://u:p@example.com/b", "SIDECAR_BOT_TOKEN": "x"})


def test_redacted_settings_mask_a_password_inside_a_url() -> None:
    config = replace(Config(), store="redis://app:s3cret@redis:6379/0", bot_url="https://bot.example/hook")
    shown = config.redacted()
    assert shown["store"] == "redis://app:***@redis:6379/0"
    assert shown["bot_url"] == "https://bot.example/hook"
    assert "s3cret" not in repr(shown)


def test_toml_values_are_held_to_what_the_environment_is(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('auth_tokens = [" tok ", ""]\n')
    assert load(toml_path=str(toml), env={}).auth_tokens == ("tok",)  # stripped, empties dropped
    toml.write_text('auth_tokens = [""]\nhttp_addr = "0.0.0.0:8080"\n')
    with pytest.raises(ConfigError, match="SIDECAR_HTTP_ADDR"):  # no real token: loopback only
        load(toml_path=str(toml), env={})
    toml.write_text("webhook_max_attempts = 2.7\n")
    with pytest.raises(ConfigError, match="whole number"):
        load(toml_path=str(toml), env={})
    toml.write_bytes(b"log_level = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(toml_path=str(toml), env={})


def test_a_store_url_in_an_error_keeps_its_password_hidden() -> None:
    with pytest.raises(ConfigError) as e:
        load(env={"SIDECAR_STORE": "rediss://:hunter2@redis:6379/0"})
    assert "hunter2" not in str(e.value) and "SIDECAR_STORE" in str(e.value)


def test_unknown_sidecar_variables_are_named_but_kubernetes_and_client_ones_are_not() -> None:
    env = {
        "SIDECAR_DRAIN_TIMEOUTS": "99",  # misspelt
        "SIDECAR_DRAIN_TIMEOUT": "30",
        "SIDECAR_TOKEN": "x",  # the CLI client's own
        "SIDECAR_SERVICE_HOST": "10.0.0.1",  # Kubernetes, for a Service named "sidecar"
        "SIDECAR_PORT_8080_TCP_ADDR": "10.0.0.1",
        "SIDECARS": "not ours",
    }
    assert config.unknown_variables(env) == ["SIDECAR_DRAIN_TIMEOUTS"]
