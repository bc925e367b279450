"""The embedded bots: echo, and script rules loaded from YAML or TOML."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.bots import create_bot
from sidecar.bots.base import BotReply
from sidecar.bots.echo import EchoBot
from sidecar.bots.script import ScriptBot
from sidecar.config import Config, ConfigError
from sidecar.models import InboundMessage, StoredMessage
from sidecar.observability import Metrics


def stored(text: str = "hello", type: str = "text") -> StoredMessage:
    m = InboundMessage.normalized(
        user_id="u1", message_id="m1", conversation_id="c1", type=type, text=text, payload=None
    )
    return StoredMessage(id="s1", message=m, fingerprint=m.fingerprint(), received_at=0.0)


async def run(bot: object, message: StoredMessage) -> list[BotReply]:
    out: list[BotReply] = []

    async def emit(reply: BotReply) -> None:
        out.append(reply)

    await bot.start()  # type: ignore[attr-defined]
    out += await bot.handle(message, emit)  # type: ignore[attr-defined]
    return out


async def test_echo_answers_text_with_its_text() -> None:
    assert await run(EchoBot(), stored("hi")) == [BotReply(type="text", payload={"text": "hi"})]


async def test_echo_does_not_answer_other_types() -> None:
    assert await run(EchoBot(), stored("a picture", type="image")) == []


RULES = """
rules:
  - match: {type: text, text: "hello"}
    replies:
      - {type: text, payload: {text: "Hi {userId}!"}}
      - {type: text, payload: {text: "second"}, delay: 0.01}
  - match: {regex: "^order (\\\\d+)(?P<rest>.*)$"}
    replies: [{type: text, payload: {text: "Order {1} {rest} {unknown}", n: 1}}]
  - match: {type: image}
    replies: []
default:
  replies: [{type: text, payload: {text: "Sorry: {text}"}}]
"""


@pytest.fixture
def script(tmp_path: Path) -> ScriptBot:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return ScriptBot(str(path))


async def test_exact_rule_gives_its_replies_in_order_with_placeholders(script: ScriptBot) -> None:
    replies = await run(script, stored("hello"))
    assert [r.payload for r in replies] == [{"text": "Hi u1!"}, {"text": "second"}]


async def test_regex_rule_fills_numbered_and_named_groups_and_keeps_unknown_placeholders(script: ScriptBot) -> None:
    (reply,) = await run(script, stored("order 42 now"))
    assert reply.payload == {"text": "Order 42  now {unknown}", "n": 1}


async def test_rule_may_give_zero_replies(script: ScriptBot) -> None:
    assert await run(script, stored("x", type="image")) == []


async def test_default_answers_when_no_rule_matches(script: ScriptBot) -> None:
    assert [r.payload for r in await run(script, stored("what?"))] == [{"text": "Sorry: what?"}]


async def test_delays_that_cannot_fit_in_the_bot_timeout_are_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "slow.yaml"
    path.write_text(
        "rules:\n  - match: {text: hi}\n    replies: [{type: text, payload: {text: a}, delay: 1},"
        " {type: text, payload: {text: b}, delay: 1.5}]\n"
    )
    with pytest.raises(ConfigError, match=r"rule 0: its delays add up to 2.5s.*SIDECAR_BOT_TIMEOUT"):
        await ScriptBot(str(path), timeout=2.0).start()
    await ScriptBot(str(path), timeout=3.0).start()  # fits


async def test_toml_rules_work_too(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nmatch = {text = "ping"}\nreplies = [{type = "text", payload = {text = "pong"}}]\n')
    assert [r.payload for r in await run(ScriptBot(str(path)), stored("ping"))] == [{"text": "pong"}]
    assert await run(ScriptBot(str(path)), stored("other")) == []


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("rules: {}", "'rules' must be a list"),
        ("rules: [{match: {regex: '('}, replies: []}]", "rule 0: invalid regex"),
        ("rules: [{match: {}, replies: [{payload: 1}]}]", "rule 0 reply 0"),
        ("rules: [{match: {}, replies: []}, {match: {colour: red}, replies: []}]", "rule 1: unknown match keys"),
        ("rules: [{match: {}, replies: [{type: t, delay: 999}]}]", "delay"),
        ("rules: [{match: {}}]", "'replies' must be a list"),
        (": not yaml :", "not valid YAML"),
        # Replies the core would refuse at run time, dead-lettering every message they match:
        ("rules: [{match: {}, replies: [{type: t, payload: {n: .nan}}]}]", "rule 0 reply 0: payload"),
        ("rules: [{match: {}, replies: [{type: t, payload: {when: 2024-01-01}}]}]", "rule 0 reply 0: payload"),
        ("default: {replies: [{type: t, payload: {n: 9007199254740993}}]}", "default reply 0: payload"),
        ("rules: [{match: {}, replies: [{type: " + "t" * 300 + "}]}]", "rule 0 reply 0: type"),
    ],
)
async def test_invalid_rules_fail_at_start_naming_file_and_rule(tmp_path: Path, content: str, named: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=named) as e:
        await ScriptBot(str(path)).start()
    assert str(path) in str(e.value)


async def test_a_rules_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("rules: [{match: {text: caf\u00e9}, replies: []}]".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        await ScriptBot(str(path)).start()


def test_create_bot_builds_the_configured_bot(tmp_path: Path) -> None:
    metrics = Metrics()
    assert isinstance(create_bot(Config(), metrics), EchoBot)
    assert isinstance(create_bot(replace(Config(), bot="script", bot_script="x.yaml"), metrics), ScriptBot)
