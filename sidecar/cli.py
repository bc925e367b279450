"""The `sidecar` command: serve the sidecar, send a message to one, tail a conversation's replies,
list and replay dead letters (`dlq`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import fields
from importlib import metadata
from urllib.parse import quote, urlencode, urlsplit

from sidecar.config import Config, ConfigError, describe, load, redact_url, unknown_variables
from sidecar.models import JSON

if typing.TYPE_CHECKING:
    from sidecar import client as client_types  # imported lazily at run time: --help stays fast

Subparsers: typing.TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]

DEFAULT_GRPC = "127.0.0.1:50051"
TOKEN_ENV = "SIDECAR_TOKEN"  # noqa: S105 - the name of a variable, not a token


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


def _metavar(name: str, kind: object) -> str:
    if kind is bool:
        return "true|false"
    if typing.get_origin(kind) is tuple:
        return "A,B,..."
    if kind is int:
        return "N"
    if kind is float:
        return "NUM"
    for suffix, metavar in (("_addr", "HOST:PORT"), ("_url", "URL"), ("_file", "FILE"), ("_script", "FILE")):
        if name.endswith(suffix):
            return metavar
    return "VALUE"


# --- serve ----------------------------------------------------------------------


def add_serve_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the sidecar",
        description="Run the sidecar until SIGTERM or Ctrl-C, then drain and exit 0. Settings come from "
        "defaults < the --config TOML file < SIDECAR_* environment variables < these flags.",
        epilog="Exit codes: 0 after a clean drain; 2 for an invalid setting, including one found wrong only "
        "while starting (a port in use, a store in use or unreachable, the script file, TLS files); 1 for any "
        "other failure to start.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file whose keys are the setting names in snake case")
    settings = parser.add_argument_group(
        "settings", "Every setting also has an environment variable; a flag given here wins over it."
    )
    hints = typing.get_type_hints(Config)
    rows = {flag: (var, default, text) for flag, var, default, text in describe()}
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        var, default, text = rows[flag]
        kind = hints[f.name]
        extra = "; comma-separated" if typing.get_origin(kind) is tuple else ""
        if f.metadata.get("secret"):
            # Flags show up in `ps` and shell history; the variable does not.
            extra += "; secret: prefer the variable"
        shown = default if default != "" else "none"
        parser_help = f"{text} [{var}; default: {shown}{extra}]"
        # Strings, parsed by config.load, so a bad value gets the same message as from the environment.
        settings.add_argument(flag, dest=f.name, metavar=_metavar(f.name, kind), default=None, help=_help(parser_help))
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    flags = {f.name: getattr(args, f.name) for f in fields(Config)}
    try:
        config = load(toml_path=args.config, env=os.environ, flags=flags)
    except ConfigError as e:
        print(f"sidecar: {e}", file=sys.stderr)
        return 2
    # Imported here so that --help, send and tail never load the server.
    from sidecar.app import run

    return run(config, unknown_variables(os.environ))


# --- send -----------------------------------------------------------------------


def _add_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls", action="store_true", help="speak TLS over gRPC, for a sidecar with SIDECAR_TLS_CERT_FILE"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="verify the sidecar's certificate with this CA bundle (implies --tls; also for https:// URLs) "
        "[default: the system's CAs]",
    )


def _tls(args: argparse.Namespace) -> client_types.Tls:
    from sidecar import client

    return client.Tls(enabled=bool(args.tls or args.tls_ca), ca_file=args.tls_ca)


def _add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        type=_token,
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token, one of the server's SIDECAR_AUTH_TOKENS [default: ${TOKEN_ENV}, else none]",
    )


def _token(value: str) -> str:
    """A token as a header can carry it: printable ASCII, no spaces. grpc refuses anything
    else as INTERNAL "Invalid metadata" on every attempt, which tail would retry for ever."""
    if not value or not all("!" <= ch <= "~" for ch in value):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces (a trailing newline?)")
    return value


def add_send_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "send",
        help="send one user message to a sidecar",
        description="Send one user message over gRPC (the default) or HTTP and print the answer as one JSON "
        "line. Sending the same --message-id again is answered as a duplicate.",
        epilog="Exit codes: 0 accepted (or duplicate), 1 refused or unreachable (details on stderr), 2 bad usage.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grpc", metavar="ADDR", help=f"gRPC address host:port [default: {DEFAULT_GRPC}]")
    where.add_argument("--http", metavar="URL", help="HTTP ingress URL, e.g. http://127.0.0.1:8080/webhook")
    _add_token(parser)
    _add_tls(parser)
    parser.add_argument("--user", required=True, help="userId: the end user")
    parser.add_argument("--conversation", required=True, help="conversationId: the client's conversation id")
    parser.add_argument("--message-id", metavar="ID", help="messageId; a repeat is a duplicate [default: a new UUID4]")
    parser.add_argument("--type", default="text", help="message type [default: text]")
    parser.add_argument("--text", default="", help='the text, or a summary of the payload [default: ""]')
    parser.add_argument(
        "--payload",
        metavar="JSON",
        help='any JSON value, e.g. \'{"text": "hi"}\' [default: absent, so the sidecar uses {"text": TEXT}]',
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, default=10.0, help="seconds to wait for the answer [default: 10]"
    )
    parser.set_defaults(handler=_send, parser=parser)


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, got {text!r}")
    return value


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _http_url(value: str) -> bool:
    """An http(s) URL with a host and a valid port, as far as can be told without a request;
    without credentials (urllib would take "user:pass@host" for a host name: use --token)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for "host:abc"
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname) and "@" not in parts.netloc


def _parse_payload(text: str) -> JSON:
    def refuse(constant: str) -> JSON:
        raise ValueError(f"{constant} is not JSON")

    # NaN and Infinity are not JSON and would not survive the round trip through the sidecar.
    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _quiet_grpc() -> None:
    # gRPC's core logs connection events (GOAWAY, reconnects) to stderr at INFO; the client reports
    # what matters itself. Must happen before grpc is imported; an explicit GRPC_VERBOSITY still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _send(args: argparse.Namespace) -> int:
    _quiet_grpc()
    from sidecar import client

    parser: argparse.ArgumentParser = args.parser
    payload = None
    if args.payload is not None:
        try:
            payload = _parse_payload(args.payload)
        except ValueError as e:
            parser.error(f"--payload is not valid JSON: {e}")
    if args.http is not None and not _http_url(args.http):
        parser.error(
            f"--http expects an http:// or https:// URL with a host and no credentials, got {redact_url(args.http)!r}"
        )
    message = client.Outgoing(
        user_id=args.user,
        message_id=args.message_id or str(uuid.uuid4()),
        conversation_id=args.conversation,
        type=args.type,
        text=args.text,
        payload=payload,
    )
    try:
        if args.http is not None:
            answer = client.send_http(args.http, args.token, message, args.timeout, _tls(args))
        else:
            answer = client.send_grpc(args.grpc or DEFAULT_GRPC, args.token, message, args.timeout, _tls(args))
    except client.ClientError as e:
        print(f"sidecar send: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # the payload cannot become a google.protobuf.Value (e.g. nested too deep)
        print(f"sidecar send: the payload cannot be sent: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, ensure_ascii=False), flush=True)
    return 0


# --- tail -----------------------------------------------------------------------


def add_tail_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "tail",
        help="print a conversation's replies as they arrive",
        description="Subscribe to a conversation over gRPC and print each reply as one JSON line. When the "
        "connection drops or the server is busy or restarting, reconnect (backoff 0.2 s doubling to 5 s) "
        "from the last sequence printed, so no reply is missed or printed twice.",
        epilog="Exit codes: 0 on Ctrl-C, --max-replies or (with --once) the end of the stream; 1 when the server "
        "refuses (bad token, bad conversation id, cursor older than what it retains).",
    )
    parser.add_argument("conversation", metavar="CONVERSATION", help="conversationId to follow")
    parser.add_argument(
        "--after",
        metavar="N",
        type=_whole(0, 2**64 - 1),  # the proto's uint64
        help="first replay every reply with sequence > N (0: all retained replies) [default: live replies only]",
    )
    parser.add_argument("--grpc", metavar="ADDR", default=DEFAULT_GRPC, help=f"gRPC address [default: {DEFAULT_GRPC}]")
    _add_token(parser)
    _add_tls(parser)
    parser.add_argument("--once", action="store_true", help="do not reconnect: exit when the stream ends or fails")
    parser.add_argument(
        "--max-replies", metavar="N", type=_whole(0), help="exit 0 after printing N replies [default: no limit]"
    )
    parser.set_defaults(handler=_tail)


def _tail(args: argparse.Namespace) -> int:
    _quiet_grpc()
    from sidecar import client

    options = client.TailOptions(
        target=args.grpc,
        token=args.token,
        conversation_id=args.conversation,
        after=args.after,
        once=args.once,
        max_replies=args.max_replies,
        tls=_tls(args),
    )
    if options.max_replies == 0:
        return 0
    try:
        return client.tail(options, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how one stops following: not an error
    except client.ClientError as e:
        print(f"sidecar tail: {e}", file=sys.stderr)
        return 1


# --- dlq ----------------------------------------------------------------------


DEFAULT_ADMIN = "http://127.0.0.1:9090"


def add_dlq_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "dlq",
        help="list, inspect, replay or purge dead letters (through the admin API)",
        description="Dead letters are replies the response URL never accepted and messages the bot could not "
        "handle. Replay puts them back: a reply re-enters its conversation's outbox at its sequence (order and "
        "webhook-id are kept), a message goes back to the bot.",
        epilog="--admin, --token and --timeout come before COMMAND: sidecar dlq --admin URL list. "
        "Exit codes: 0 done, 1 refused or unreachable (details on stderr), 2 bad usage.",
    )
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help=f"admin listener URL (default {DEFAULT_ADMIN})")
    parser.add_argument(
        "--token",
        type=_token,
        default=os.environ.get("SIDECAR_ADMIN_TOKEN") or None,
        help="admin bearer token, one of SIDECAR_ADMIN_TOKENS (default: $SIDECAR_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, default=10.0, help="seconds to wait for the answer (default 10)"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="verify an https:// admin listener (SIDECAR_ADMIN_TLS) with this CA bundle [default: the system's CAs]",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    ls = commands.add_parser("list", help="print dead letters, oldest first, one JSON object per line")
    ls.add_argument("--kind", choices=("reply", "message"), help="only replies or only messages")
    ls.add_argument("--conversation", help="only this conversation")
    ls.add_argument("--limit", type=_whole(1, 1000), default=100, help="at most this many, 1 to 1000 (default 100)")
    ls.add_argument("--after", metavar="NEXT", help="continue a listing: the NEXT a previous page printed")
    ls.set_defaults(handler=_dlq_list)
    show = commands.add_parser("show", help="print one dead letter with its body and last error")
    show.add_argument("id", help="the dead letter's id (from list)")
    show.set_defaults(handler=_dlq_show)
    for name, verb in (("replay", "put back for delivery"), ("purge", "delete for good")):
        sub = commands.add_parser(name, help=f"{verb}: some ids, one conversation, or --all")
        sub.add_argument("ids", nargs="*", help="dead letter ids")
        sub.add_argument("--conversation", help="every dead letter of this conversation")
        sub.add_argument("--all", action="store_true", help="every dead letter (of --kind, if given)")
        sub.add_argument("--kind", choices=("reply", "message"), help="with --conversation or --all")
        sub.set_defaults(handler=_dlq_change, verb=name)


def _dlq_call(args: argparse.Namespace, method: str, path: str, body: JSON | None = None) -> int:
    from sidecar import client

    # API paths are appended to it: a query or fragment would swallow them.
    if not _http_url(args.admin) or urlsplit(args.admin).query or urlsplit(args.admin).fragment:
        shown = redact_url(args.admin)
        print(
            f"sidecar dlq: --admin expects an http(s) URL with a host, no credentials and no query, got {shown!r}",
            file=sys.stderr,
        )
        return 2
    try:
        context = client.Tls(enabled=True, ca_file=args.tls_ca).context()
        answer = client.http_json(method, args.admin.rstrip("/") + path, args.token, body, args.timeout, context)
    except client.ClientError as e:
        print(f"sidecar dlq: {e}", file=sys.stderr)
        return 1
    items = answer.get("deadLetters") if isinstance(answer, dict) else None
    for item in items if isinstance(items, list) else [answer]:
        print(json.dumps(item, ensure_ascii=False), flush=True)
    if isinstance(answer, dict) and answer.get("more"):
        print(f"sidecar dlq: there are more: list --after {answer.get('next')} for the next page", file=sys.stderr)
    return 0


def _dlq_list(args: argparse.Namespace) -> int:
    query = {
        "limit": str(args.limit),
        "kind": args.kind or "",
        "conversationId": args.conversation or "",
        "after": args.after or "",
    }
    return _dlq_call(args, "GET", "/v1/dead-letters?" + urlencode({k: v for k, v in query.items() if v}))


def _dlq_show(args: argparse.Namespace) -> int:
    return _dlq_call(args, "GET", "/v1/dead-letters/" + quote(args.id, safe=""))


def _dlq_change(args: argparse.Namespace) -> int:
    chosen = bool(args.ids) + bool(args.conversation) + bool(args.all)
    if chosen != 1:
        print(f"sidecar dlq {args.verb}: give ids, or --conversation C, or --all (exactly one)", file=sys.stderr)
        return 2
    body: dict[str, JSON] = {"ids": args.ids, "conversationId": args.conversation or "", "all": args.all}
    if args.kind:
        body["kind"] = args.kind
    return _dlq_call(args, "POST", f"/v1/dead-letters/{args.verb}", body)


# --- entry point ----------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("sidecar")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A messaging sidecar: Botpress Messaging API compatible HTTP and gRPC ingress, "
        "durable delivery of bot replies.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_serve_parser(subparsers)
    add_send_parser(subparsers)
    add_tail_parser(subparsers)
    add_dlq_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130  # the shell's convention for "stopped by SIGINT"
    except BrokenPipeError:
        # The reader went away (`sidecar tail ... | head`): not an error. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
