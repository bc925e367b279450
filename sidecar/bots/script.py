"""The script bot: a YAML or TOML rules file maps messages to 0..n replies, with delays.

```yaml
rules:
  - match: {type: text, text: "hello"}          # exact text; type defaults to any
    replies:
      - {type: text, payload: {text: "Hi {userId}!"}}
      - {type: text, payload: {text: "How can I help?"}, delay: 0.5}
  - match: {regex: "^order (\\d+)$"}             # re.search on the text; groups as {1}, {name}
    replies: [{type: text, payload: {text: "Order {1} is on its way"}}]
  - match: {type: image}
    replies: []                                   # zero replies
default:                                          # when nothing matches; absent: no reply
  replies: [{type: text, payload: {text: "Sorry, I did not get that: {text}"}}]
```

The first matching rule wins. Placeholders ({text}, {userId}, {conversationId},
{messageId}, {type}, regex groups) are replaced in the payload's strings;
unknown ones stay as written. ``delay`` (seconds, at most 60) waits before
that reply.
"""

from __future__ import annotations

import asyncio
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.bots.base import Bot, BotReply, Emit
from sidecar.config import ConfigError
from sidecar.models import JSON, StoredMessage
from sidecar.validate import reply_problems

MAX_DELAY = 60.0
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class _Reply:
    type: str
    payload: JSON
    delay: float


@dataclass(frozen=True, slots=True)
class _Rule:
    type: str | None
    text: str | None
    regex: re.Pattern[str] | None
    replies: tuple[_Reply, ...]

    def match(self, type_: str, text: str) -> dict[str, str] | None:
        """The placeholder values this rule adds (regex groups), or None when it does not match."""
        if self.type is not None and self.type != type_:
            return None
        if self.text is not None and self.text != text:
            return None
        if self.regex is None:
            return {}
        found = self.regex.search(text)
        if found is None:
            return None
        groups = {str(i): g or "" for i, g in enumerate(found.groups(), start=1)}
        groups.update({k: v or "" for k, v in found.groupdict().items()})
        return groups


class ScriptBot(Bot):
    """Replies from a rules file, loaded and checked at start()."""

    name = "script"

    def __init__(
        self,
        path: str,
        timeout: float = math.inf,
        *,
        max_id_length: int = 256,
        max_payload_depth: int = 32,
        max_replies: int = 100,
    ) -> None:
        self._path = path
        self._timeout = timeout  # the sidecar's bot_timeout, which a whole run must fit in
        self._max_replies = max_replies  # max_replies_per_message: more would dead-letter every match
        self._limits = {"max_id_length": max_id_length, "max_payload_depth": max_payload_depth}
        self._rules: tuple[_Rule, ...] = ()
        self._default: tuple[_Reply, ...] = ()

    async def start(self) -> None:
        self._rules, self._default = load_rules(self._path)
        # A run waits out all of its replies' delays inside the bot timeout: delays that
        # add up to it could never succeed, and every message would end dead-lettered.
        for name, replies in [*((f"rule {i}", r.replies) for i, r in enumerate(self._rules)),
                              ("default", self._default)]:  # fmt: skip
            if len(replies) > self._max_replies:
                raise ConfigError(
                    f"bot_script (SIDECAR_BOT_SCRIPT): {self._path} {name}: {len(replies)} replies, over"
                    f" max_replies_per_message (SIDECAR_MAX_REPLIES_PER_MESSAGE, {self._max_replies})"
                )
            total = sum(reply.delay for reply in replies)
            if total >= self._timeout:
                raise ConfigError(
                    f"bot_script (SIDECAR_BOT_SCRIPT): {self._path} {name}: its delays add up to {total:g}s,"
                    f" which must stay under bot_timeout (SIDECAR_BOT_TIMEOUT, {self._timeout:g}s)"
                )
            # The core checks every reply before storing it: one it would refuse (a YAML date,
            # .nan, an integer past 2^53, ...) would dead-letter every message the rule
            # matches. Placeholders only put strings in, so a reply fine here stays fine.
            for i, reply in enumerate(replies):
                if bad := reply_problems(reply.type, reply.payload, {}, **self._limits):
                    problems = "; ".join(f"{v.field} {v.reason}" for v in bad)
                    raise ConfigError(f"bot_script (SIDECAR_BOT_SCRIPT): {self._path} {name} reply {i}: {problems}")

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        m = message.message
        values = {
            "text": m.text,
            "userId": m.user_id,
            "conversationId": m.conversation_id,
            "messageId": m.message_id,
            "type": m.type,
        }
        replies = self._default
        for rule in self._rules:
            groups = rule.match(m.type, m.text)
            if groups is not None:
                values.update(groups)
                replies = rule.replies
                break
        ready: list[BotReply] = []
        for reply in replies:
            if reply.delay:
                # What comes before a pause goes out now, not after it.
                for early in ready:
                    await emit(early)
                ready = []
                await asyncio.sleep(reply.delay)
            ready.append(BotReply(type=reply.type, payload=_substitute(reply.payload, values)))
        return ready


def _substitute(value: JSON, values: dict[str, str]) -> JSON:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    return value


def load_rules(path: str) -> tuple[tuple[_Rule, ...], tuple[_Reply, ...]]:
    """Parse and check a rules file; every error names the file and the rule."""
    where = f"bot_script (SIDECAR_BOT_SCRIPT): {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text) if path.endswith(".toml") else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: not valid {'TOML' if path.endswith('.toml') else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'rules' (and optionally 'default')")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}: 'rules' must be a list")
    rules = tuple(_rule(raw, f"{where} rule {i}") for i, raw in enumerate(raw_rules))
    default: tuple[_Reply, ...] = ()
    if "default" in data:
        raw_default = data["default"]
        if not isinstance(raw_default, dict):
            raise ConfigError(f"{where} default: must be a mapping with 'replies'")
        default = _replies(raw_default.get("replies"), f"{where} default")
    return rules, default


def _rule(raw: Any, where: str) -> _Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with 'match' and 'replies'")
    match = raw.get("match", {})
    if not isinstance(match, dict):
        raise ConfigError(f"{where}: 'match' must be a mapping")
    unknown = set(match) - {"type", "text", "regex"}
    if unknown:
        raise ConfigError(f"{where}: unknown match keys {sorted(unknown)} (use type, text, regex)")
    for key in ("type", "text", "regex"):
        if key in match and not isinstance(match[key], str):
            raise ConfigError(f"{where}: match.{key} must be a string")
    regex = None
    if "regex" in match:
        try:
            regex = re.compile(match["regex"])
        except re.error as e:
            raise ConfigError(f"{where}: invalid regex: {e}") from None
    return _Rule(match.get("type"), match.get("text"), regex, _replies(raw.get("replies"), where))


def _replies(raw: Any, where: str) -> tuple[_Reply, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'replies' must be a list (it may be empty)")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or not isinstance(r.get("type"), str) or not r["type"]:
            raise ConfigError(f"{where} reply {i}: needs a non-empty string 'type'")
        delay = r.get("delay", 0)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY:
            raise ConfigError(f"{where} reply {i}: delay must be a number of seconds from 0 to {MAX_DELAY:g}")
        out.append(_Reply(r["type"], r.get("payload"), float(delay)))
    return tuple(out)
