"""The `botpress` bot: a Botpress bot behind its "Messaging API" integration.

Each message is POSTed to the integration's webhook URL in the exact SPEC §2
format with ``Authorization: bearer <personal access token>``. Botpress
answers with the created objects, not with replies: the bot's replies arrive
later at the sidecar's ``POST /bot/replies`` (the integration's "Response
Endpoint URL"), in the SPEC §3 format, routed by ``conversationId`` and
keeping Botpress's ids.
"""

from __future__ import annotations

from sidecar.bots.base import BotReply, Emit
from sidecar.bots.http import HttpBot
from sidecar.models import JSON, StoredMessage

_CATCH_ALL = b"Unknown Error! Please contact the Botpress Team"


class BotpressBot(HttpBot):
    name = "botpress"

    def request_body(self, message: StoredMessage) -> JSON:
        return message.message.api_json()

    def headers(self) -> dict[str, str]:
        # The integration documents the lower-case scheme; the sidecar's own ingress accepts either.
        return {"Content-Type": "application/json", "Authorization": f"bearer {self._config.bot_token}"}

    def transient(self, status: int, raw: bytes | None) -> bool:
        # The integration answers 400 with this text whenever one of its own calls to
        # the Botpress API fails, a blip or a refusal of this very message alike: taken
        # as a 5xx (retried with backoff, counted by the breaker), since a blip must not
        # dead-letter a message. Like any message the bot keeps failing on, one Botpress
        # refuses holds the breaker open now and then until its attempts run out. A
        # message the integration cannot validate gets a 400 naming the problem, final.
        return super().transient(status, raw) or (
            status == 400 and raw is not None and raw.lstrip().startswith(_CATCH_ALL)
        )

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        # The integration answers with the objects it created (the message echoed back,
        # so about as large as it): any 2xx means it took the message, whatever the body.
        await self.call(message, answer=False)
        return []  # the replies come through /bot/replies
