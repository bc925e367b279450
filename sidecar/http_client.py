"""What the sidecar's HTTP clients (webhook delivery, the HTTP and Botpress bots) share."""

from __future__ import annotations

import email.utils

import aiohttp


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole (decoded) body when it is at most ``limit`` bytes, else None.

    ``resp.content.read(n)`` is not this: it returns what has arrived so far,
    so a body sent in several writes would be cut short. Past the limit the
    connection is closed rather than drained, so a peer streaming without end
    (or a compressed body that inflates) costs at most ``limit`` bytes.
    """
    if resp.content_length is not None and resp.content_length > limit:
        resp.close()
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            resp.close()
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() is also true of "²" and "٣"
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except Exception:  # noqa: BLE001 - any header the peer sends: unparseable is "none"
        return None
    return max(0.0, when.timestamp() - now)
