"""One typed, frozen configuration: defaults < TOML file < SIDECAR_* environment < flags."""

from __future__ import annotations

import base64
import ipaddress
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from standardwebhooks.webhooks import Webhook

ENV_PREFIX = "SIDECAR_"


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and its variable."""


def _opt(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the sidecar. Each has the variable SIDECAR_<NAME> and the flag --<name>."""

    # --- listeners ---
    http_addr: str = _opt("127.0.0.1:8080", "HTTP ingress and bot callbacks, host:port")
    grpc_addr: str = _opt("127.0.0.1:50051", "gRPC MessagingService, health and reflection")
    admin_addr: str = _opt("0.0.0.0:9090", "/healthz, /readyz, /metrics and the admin API")
    webhook_path: str = _opt("/webhook", "path of the Messaging API compatible ingress")
    # --- auth ---
    auth_tokens: tuple[str, ...] = _opt((), "bearer tokens accepted on HTTP and gRPC ingress", secret=True)
    auth_tokens_file: str = _opt("", "file with one accepted token per line, re-read when it changes")
    callback_tokens: tuple[str, ...] = _opt((), "bearer tokens accepted on POST /bot/replies", secret=True)
    callback_secret_path: str = _opt("", "unguessable path segment: POST /bot/replies/<it> needs no token", secret=True)
    admin_tokens: tuple[str, ...] = _opt((), "bearer tokens for the admin API (dead letters)", secret=True)
    allow_unauthenticated: bool = _opt(False, "serve ingress beyond loopback without tokens")
    tls_cert_file: str = _opt("", "PEM certificate chain: serve HTTP ingress and gRPC over TLS")
    tls_key_file: str = _opt("", "PEM private key of tls_cert_file")
    http_header_timeout: float = _opt(30.0, "seconds a client has to send a request's headers (HTTP and admin)")
    http_body_timeout: float = _opt(30.0, "seconds a client has to send a request's body once its handler reads it")
    http_max_connections: int = _opt(
        4096, "open connections per HTTP listener (HTTP and admin); more are closed at once"
    )
    grpc_max_connections: int = _opt(
        4096, "open connections to the gRPC listener; more are closed by grpc core at once"
    )
    admin_tls: bool = _opt(False, "serve the admin listener over TLS too, with tls_cert_file (probes then use HTTPS)")
    # --- outbound webhook ---
    response_url: str = _opt("", "where replies are POSTed; empty: no webhook delivery")
    response_authorization: str = _opt("", "Authorization header value sent with every webhook POST", secret=True)
    webhook_secret: str = _opt("", "Standard Webhooks signing secret(s), whsec_..., space-separated", secret=True)
    check_response_url: bool = _opt(True, "POST the integration's test body to the response URL at start")
    webhook_timeout: float = _opt(10.0, "seconds allowed for one webhook attempt")
    webhook_max_attempts: int = _opt(15, "attempts before a reply is dead-lettered")
    webhook_max_age: float = _opt(86400.0, "seconds after the first attempt before a reply is dead-lettered")
    webhook_backoff_initial: float = _opt(0.5, "first retry delay in seconds (full jitter)")
    webhook_backoff_max: float = _opt(60.0, "cap of the retry delay in seconds")
    webhook_retry_after_max: float = _opt(
        300.0, "cap on a receiver's Retry-After, in seconds (never sooner than the first backoff step)"
    )
    webhook_concurrency: int = _opt(64, "conversations delivered concurrently")
    # --- bot ---
    bot: str = _opt("echo", "echo, script, http or botpress")
    bot_url: str = _opt("", "URL of the http bot or of the Botpress integration's webhook")
    bot_token: str = _opt("", "bearer token sent to the http or botpress bot", secret=True)
    bot_format: str = _opt("json", "json or rasa, for the http bot")
    bot_script: str = _opt("", "rules file (YAML or TOML) for the script bot")
    bot_timeout: float = _opt(30.0, "seconds allowed for one bot attempt")
    bot_max_attempts: int = _opt(10, "bot attempts before a message is dead-lettered")
    bot_backoff_initial: float = _opt(0.5, "first bot retry delay in seconds (full jitter)")
    bot_backoff_max: float = _opt(30.0, "cap of the bot retry delay in seconds")
    bot_breaker_failures: int = _opt(5, "consecutive http/botpress bot failures that open its circuit breaker")
    bot_breaker_cooldown: float = _opt(30.0, "seconds an open breaker waits before letting one call through")
    bot_concurrency: int = _opt(64, "messages handed to the bot at once (one per conversation at a time)")
    # --- store ---
    store: str = _opt(
        "sqlite:///./data/sidecar.db",
        "sqlite:///path, memory:// or redis://host:port/db[?prefix=...]",
    )
    store_sync: str = _opt("full", "SQLite synchronous mode: full survives power loss, normal only crashes")
    reply_retention: int = _opt(10000, "replies kept per conversation for replay (undelivered ones are always kept)")
    reply_max_age: float = _opt(
        604800.0, "seconds a reply is kept for replay (undelivered and dead-lettered ones are always kept)"
    )
    dedupe_window: float = _opt(
        86400.0, "seconds a handled message is remembered: a repeat of its messageId within it is a duplicate"
    )
    # --- limits ---
    max_body_bytes: int = _opt(1024 * 1024, "largest HTTP request body")
    max_id_length: int = _opt(256, "longest userId, messageId and conversationId (and a reply's type and ids)")
    max_payload_depth: int = _opt(32, "deepest nesting of a payload")
    max_pending_messages: int = _opt(10000, "messages waiting for the bot before ingress answers 429")
    max_replies_per_message: int = _opt(
        100, "replies one bot answer or one callback request may carry (more: a dead letter, or a 400)"
    )
    max_pending_bytes: int = _opt(
        64 * 1024 * 1024,
        "memory the messages waiting for the bot may take (estimated from their JSON) before ingress answers 429",
    )
    stream_queue_size: int = _opt(1024, "replies buffered per subscriber before it is cut off")
    max_streams: int = _opt(20000, "concurrent Subscribe streams")
    # --- process ---
    drain_timeout: float = _opt(20.0, "seconds SIGTERM waits for in-flight work")
    log_format: str = _opt("text", "text or json")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, safe to log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)  # credentials inside a URL (a redis:// store, a bot URL)
            out[f.name] = value
        return out


_SECRET_PARAM = re.compile(
    r"([?&;][^=&#;]*(?:pass|pwd|token|secret|key|auth|sig|credential|code)[^=&#;]*=)[^&#;]*", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """The URL with what may be a credential replaced by ``***``: safe for messages and logs.

    That is the password of its user info, up to the *last* "@" (an unencoded
    password may hold "/", "?", "#" or "@", which a URL parser would read as the
    path, query or fragment), and the value of every query parameter whose name
    looks like one (``password=``, ``token=``, ``api_key=``, ...)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        user_info, _, host_and_more = rest.rpartition("@")
        user, colon, _ = user_info.partition(":")
        # "user:password@": keep the user; a lone "token@" may itself be the secret.
        rest = f"{user}:***@{host_and_more}" if colon else f"***@{host_and_more}"
    return f"{scheme}{sep}{_SECRET_PARAM.sub(lambda m: m.group(1) + '***', rest)}"


# --- parsing ----------------------------------------------------------------


def _kind(f: Any) -> type:
    hint = typing.get_type_hints(Config)[f.name]
    if typing.get_origin(hint) is tuple:
        return tuple
    return typing.cast(type, hint)


# The largest whole-number setting: what gRPC's channel options (C ints) can hold.
MAX_INT = 2**31 - 1


def _parse(name: str, kind: type, raw: Any, source: str) -> Any:
    """Turn a raw TOML value or string into the setting's type, or say which setting is wrong."""
    where = f"{name} ({source})"
    if kind is tuple:
        if isinstance(raw, str):
            return tuple(t.strip() for t in raw.split(",") if t.strip())
        if isinstance(raw, list) and all(isinstance(t, str) for t in raw):
            return tuple(t.strip() for t in raw if t.strip())
        raise ConfigError(f"{where}: expected a comma-separated string or a list of strings")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if isinstance(raw, str) and raw.strip().lower() in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if kind in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected a number")
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {raw!r}")  # not cut to one silently
        try:
            value = kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
        if kind is int and abs(value) > MAX_INT:
            # gRPC takes its limits as C ints, SQLite as 64-bit ones: beyond that, a crash at start.
            raise ConfigError(f"{where}: at most {MAX_INT}, got {raw!r}")
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: expected a string")
    return raw


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load(
    *,
    toml_path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build and validate the configuration; later sources win."""
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(Config)}
    if toml_path:
        try:
            data = tomllib.loads(Path(toml_path).read_text(encoding="utf-8-sig"))
        except OSError as e:
            raise ConfigError(f"--config: cannot read {toml_path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config: {toml_path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {toml_path} is not valid TOML: {e}") from None
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"--config: unknown setting {key!r} in {toml_path}")
            values[name] = _parse(name, _kind(known[name]), raw, toml_path)
    for name, f in known.items():
        var = env_name(name)
        if env is not None and var in env:
            values[name] = _parse(name, _kind(f), env[var], var)
    for name, raw in (flags or {}).items():
        if raw is not None and name in known:
            values[name] = _parse(name, _kind(known[name]), raw, "--" + name.replace("_", "-"))
    config = Config(**values)
    validate(config)
    return config


# SIDECAR_* variables that are not settings yet not mistakes: the CLI client's own, and
# what Kubernetes injects for a Service named "sidecar" (SIDECAR_SERVICE_HOST, SIDECAR_PORT, ...).
_NOT_SETTINGS = re.compile(r"SIDECAR_(TOKEN|ADMIN_TOKEN|TEST_STORE|SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\w+)?)")


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The SIDECAR_* names in ``env`` that no setting reads (a misspelt one would otherwise
    be ignored without a word): names only, never their values."""
    known = {env_name(f.name) for f in fields(Config)}
    return sorted(
        name for name in env if name.startswith(ENV_PREFIX) and name not in known and not _NOT_SETTINGS.fullmatch(name)
    )


def read_token_file(path: str) -> tuple[str, ...]:
    """Tokens from a file, one per line; blank lines and # comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is not part of the first token
    except OSError as e:
        raise ConfigError(f"auth_tokens_file: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"auth_tokens_file: {path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


# --- validation ---------------------------------------------------------------


def split_addr(addr: str, name: str) -> tuple[str, int]:
    """host:port (IPv6 in brackets) → (host, port); the error names the setting."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} ({env_name(name)}): expected host:port, got {addr!r}")
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"{name} ({env_name(name)}): the host is missing in {addr!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fail(name: str, why: str) -> typing.NoReturn:
    raise ConfigError(f"{name} ({env_name(name)}): {why}")


def validate(c: Config) -> None:
    """Check every setting, so a bad one stops the start with a message that names it."""
    for name in ("http_addr", "grpc_addr", "admin_addr"):
        split_addr(getattr(c, name), name)
    if c.auth_tokens_file:
        read_token_file(c.auth_tokens_file)  # fail at start, not at the first request
    if not c.auth_tokens and not c.auth_tokens_file and not c.allow_unauthenticated:
        for name in ("http_addr", "grpc_addr"):
            host, _ = split_addr(getattr(c, name), name)
            if not is_loopback(host):
                _fail(
                    name,
                    f"binding {host} without tokens would expose the ingress; set "
                    "SIDECAR_AUTH_TOKENS, or SIDECAR_ALLOW_UNAUTHENTICATED=true to allow it",
                )
    if c.admin_tls and not c.tls_cert_file:
        _fail("admin_tls", "needs SIDECAR_TLS_CERT_FILE and SIDECAR_TLS_KEY_FILE")
    if bool(c.tls_cert_file) != bool(c.tls_key_file):
        _fail("tls_key_file" if c.tls_cert_file else "tls_cert_file", "TLS needs both a certificate and a key")
    for name in ("tls_cert_file", "tls_key_file"):
        path = getattr(c, name)
        if path and not Path(path).is_file():
            _fail(name, f"{path} is not a readable file")
    if c.callback_secret_path and (
        not re.fullmatch(r"[A-Za-z0-9._~-]+", c.callback_secret_path) or c.callback_secret_path in {".", ".."}
    ):  # "." and "..": clients resolve them away before the request leaves
        _fail("callback_secret_path", "must be one path segment of letters, digits and . _ ~ - (not . or ..)")
    if not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+/?|/", c.webhook_path) or any(
        segment in {".", ".."} for segment in c.webhook_path.split("/")
    ):
        # Plain path characters only: aiohttp reads { } as a pattern, ? # are not path, and
        # a %-escape would be matched decoded, so a route with one is never reached.
        _fail("webhook_path", "must be a path of plain segments starting with /, e.g. /webhook")
    if c.webhook_path.rstrip("/") == "/bot/replies" or c.webhook_path.startswith("/bot/replies/"):
        _fail("webhook_path", "/bot/replies is the callback route's; choose another path")
    if c.bot not in {"echo", "script", "http", "botpress"}:
        _fail("bot", f"expected echo, script, http or botpress, got {c.bot!r}")
    if c.bot in {"http", "botpress"} and not _is_http_url(c.bot_url):
        _fail("bot_url", f"the {c.bot} bot needs an http(s) URL with a host (and a port from 0 to 65535)")
    if c.bot == "botpress" and not c.bot_token:
        _fail("bot_token", "the botpress bot needs the integration's personal access token")
    if c.bot == "script" and not c.bot_script:
        _fail("bot_script", "the script bot needs a rules file")
    if c.bot_format not in {"json", "rasa"}:
        _fail("bot_format", f"expected json or rasa, got {c.bot_format!r}")
    if c.response_url and not _is_http_url(c.response_url):
        _fail("response_url", "expected an http(s) URL with a host (and a port from 0 to 65535)")
    # aiohttp refuses a request with both, at every attempt: refuse the pair at start instead.
    if c.response_authorization and "@" in urlsplit(c.response_url).netloc:
        _fail("response_authorization", "cannot be combined with credentials inside SIDECAR_RESPONSE_URL")
    if c.bot_token and c.bot in {"http", "botpress"} and "@" in urlsplit(c.bot_url).netloc:
        _fail("bot_token", "cannot be combined with credentials inside SIDECAR_BOT_URL")
    # Sent as header values: a trailing newline (a Secret made from a file) would fail
    # every request, one by one, long after the start.
    for name in ("response_authorization", "bot_token"):
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in getattr(c, name)):
            _fail(name, "must not contain control characters (a trailing newline?)")
    for name in ("auth_tokens", "callback_tokens", "admin_tokens"):
        if any(not t.isprintable() or " " in t for t in getattr(c, name)):
            _fail(name, "tokens must be printable, without spaces")
    for secret in c.webhook_secret.split():
        if not secret.startswith("whsec_"):
            _fail("webhook_secret", "each secret must look like whsec_<base64>")
        key = secret[len("whsec_") :]
        try:
            base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
            Webhook(secret)  # and the signer's own checks (e.g. not empty)
        except Exception:  # noqa: BLE001 - binascii.Error or the library's own error types
            _fail("webhook_secret", "the part after whsec_ must be non-empty base64")
    store = _split(c.store)
    scheme = "" if store is None else store.scheme
    if scheme not in {"memory", "sqlite", "redis"}:
        _fail("store", f"expected sqlite:///path, memory:// or redis://host:port/db, got {redact_url(c.store)!r}")
    if scheme == "sqlite" and (not c.store.startswith("sqlite:///") or not sqlite_path(c.store)):
        # sqlite://x.db would lose its first character to the path rule below, and
        # sqlite://host/x.db name a host: three slashes, then the path.
        _fail("store", "sqlite needs three slashes and a path, e.g. sqlite:///./data/sidecar.db")
    if scheme == "redis" and store is not None and not re.fullmatch(r"/?|/\d+", store.path):
        _fail("store", "redis://host:port/db needs a database number (or none), e.g. redis://127.0.0.1:6379/0")
    if c.store_sync not in {"full", "normal"}:
        _fail("store_sync", "expected full or normal")
    if c.log_format not in {"text", "json"}:
        _fail("log_format", "expected text or json")
    if c.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        _fail("log_level", "expected DEBUG, INFO, WARNING or ERROR")
    positive = (
        "webhook_timeout", "webhook_max_attempts", "webhook_max_age", "webhook_backoff_initial",
        "webhook_backoff_max", "webhook_concurrency", "bot_timeout", "bot_max_attempts",
        "bot_backoff_initial", "bot_backoff_max", "bot_concurrency", "bot_breaker_failures", "bot_breaker_cooldown",
        "reply_retention", "reply_max_age", "dedupe_window", "http_header_timeout", "http_body_timeout",
        "http_max_connections", "grpc_max_connections", "max_body_bytes", "max_id_length", "max_payload_depth",
        "max_pending_messages", "max_pending_bytes", "max_replies_per_message", "stream_queue_size", "max_streams",
    )  # fmt: skip
    for f in fields(c):
        value = getattr(c, f.name)
        if isinstance(value, float) and not math.isfinite(value):  # "nan" <= 0 is False: caught here
            _fail(f.name, "must be a finite number")
    for name in positive:
        if getattr(c, name) <= 0:
            _fail(name, "must be greater than 0")
    for name in ("drain_timeout", "webhook_retry_after_max"):
        if getattr(c, name) < 0:
            _fail(name, "must not be negative")


def _is_http_url(url: str) -> bool:
    parts = _split(url)
    return (
        parts is not None
        and parts.scheme in {"http", "https"}
        and bool(parts.hostname)
        and not any(ch.isspace() or not ch.isprintable() for ch in url)  # "host :8080" would parse
    )


def _split(url: str) -> SplitResult | None:
    """The URL's parts, or None when it cannot be parsed (a bracket left open) or its
    port is not a number in 0-65535: refused at start, not at every request."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access, raising ValueError when invalid
    except ValueError:
        return None
    return parts


def sqlite_path(store_url: str) -> str:
    """sqlite:///./data/x.db → ./data/x.db; sqlite:////abs/x.db → /abs/x.db."""
    return store_url[len("sqlite:///") :]


def describe() -> list[tuple[str, str, str, str]]:
    """(flag, variable, default, help) for every setting: used by --help and the docs."""
    rows = []
    for f in fields(Config):
        default = f.default if not isinstance(f.default, tuple) else ",".join(f.default)
        rows.append(("--" + f.name.replace("_", "-"), env_name(f.name), str(default), f.metadata["help"]))
    return rows
