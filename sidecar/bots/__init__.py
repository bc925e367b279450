"""Bots: echo, script, http, botpress behind one interface."""

from __future__ import annotations

from sidecar.bots.base import Bot
from sidecar.config import Config, ConfigError


def create_bot(config: Config) -> Bot:
    """The bot named by ``config.bot``; constructing it does no I/O (``start`` does)."""
    if config.bot == "echo":
        from sidecar.bots.echo import EchoBot

        return EchoBot()
    if config.bot == "script":
        from sidecar.bots.script import ScriptBot

        return ScriptBot(config.bot_script)
    raise ConfigError(f"bot (SIDECAR_BOT): the {config.bot} bot is not built yet")
