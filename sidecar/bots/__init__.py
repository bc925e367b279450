"""Bots: echo, script, http, botpress behind one interface."""

from __future__ import annotations

from sidecar.bots.base import Bot
from sidecar.config import Config
from sidecar.observability import Metrics


def create_bot(config: Config, metrics: Metrics) -> Bot:
    """The bot named by ``config.bot``; constructing it does no I/O (``start`` does)."""
    if config.bot == "echo":
        from sidecar.bots.echo import EchoBot

        return EchoBot()
    if config.bot == "script":
        from sidecar.bots.script import ScriptBot

        return ScriptBot(
            config.bot_script,
            config.bot_timeout,
            max_id_length=config.max_id_length,
            max_payload_depth=config.max_payload_depth,
            max_replies=config.max_replies_per_message,
        )
    if config.bot == "http":
        from sidecar.bots.http import HttpBot

        return HttpBot(config, metrics)
    from sidecar.bots.botpress import BotpressBot  # config validation admits nothing else

    return BotpressBot(config, metrics)
