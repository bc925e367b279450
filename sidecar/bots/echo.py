"""The embedded default bot: answers each text message with its own text."""

from __future__ import annotations

from sidecar.bots.base import Bot, BotReply, Emit
from sidecar.models import StoredMessage


class EchoBot(Bot):
    """Replies ``{"type": "text", "payload": {"text": <text>}}`` to every ``text`` message.

    Messages of other types get no reply: echoing an image or a card back
    to its sender is never what a demo or a test wants.
    """

    name = "echo"

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        if message.message.type == "text":
            return [BotReply(type="text", payload={"text": message.message.text})]
        return []
