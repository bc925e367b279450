"""What the sidecar's HTTP clients (webhook delivery, the HTTP and Botpress bots) share."""

from __future__ import annotations

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
