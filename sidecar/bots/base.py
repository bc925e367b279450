"""The bot interface: given a stored message and a sink, produce 0..n replies."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sidecar.models import JSON, StoredMessage


@dataclass(frozen=True, slots=True)
class BotReply:
    """One reply as a bot gives it. Empty bot ids are filled with the sidecar's own."""

    type: str
    payload: JSON
    bot_message_id: str = ""
    bot_user_id: str = ""
    bot_conversation_id: str = ""


Emit = Callable[[BotReply], Awaitable[None]]
"""Appends one reply to the conversation's log; returns once it is durable."""


class BotError(Exception):
    """A bot failed. ``retryable=False`` means retrying cannot help (e.g. a 4xx): dead-letter now.

    ``counts=False`` means the bot was not even tried (its circuit breaker is
    open): the message waits without using up its attempts, so an outage of
    the bot delays messages (for about (bot_max_attempts - bot_breaker_failures)
    cooldowns) instead of dead-lettering them at once.
    """

    def __init__(
        self, message: str, *, retryable: bool = True, counts: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.counts = counts
        self.retry_after = retry_after  # seconds the bot asked to be left alone (Retry-After)


def too_many_replies(limit: int) -> BotError:
    """More than max_replies_per_message replies to one message: they are stored in one
    step (a loop turn; on Redis one script other clients wait behind), so bounded like
    every input. Not retried: the same bot would give the same answer."""
    return BotError(f"the bot gave more than {limit} replies to one message (max_replies_per_message)", retryable=False)


class Bot(abc.ABC):
    """A bot: the core calls ``handle`` once per attempt at a message.

    ``handle`` returns its replies; the core appends them and marks the
    message handled in one step, so a crash can never leave replies stored
    for a message that will be handed to the bot again. Replies that must
    go out before ``handle`` ends (say, before a delay) go through ``emit``,
    any number of times; each is durable and visible to subscribers when
    ``emit`` returns, and the returned ones follow them. If ``handle``
    raises, the core retries the whole message later. Replies emitted
    before the failure are not duplicated on retry, as long as the bot
    produces the same replies in the same order (the core keys them by
    message and position).
    """

    name: str = "bot"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections or load files."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what start() opened."""

    @abc.abstractmethod
    async def handle(self, message: StoredMessage, emit: Emit) -> Sequence[BotReply]:
        """Handle one message: emit early replies, return the rest (often all of them)."""
