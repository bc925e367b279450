"""Redis store: every multi-key step is one Lua script, so Redis runs it atomically.

``SIDECAR_STORE=redis://[user:password@]host:port/db[?prefix=sidecar:]``. Every
key starts with the prefix (default ``sidecar:``), so several sidecars, or a
test run, can share one database, each under a prefix of its own: a sidecar
holds its prefix's ``owner`` lease while it runs, and a second one on the
same prefix refuses to start. A sidecar whose lease lapsed (a stall, a
partition) and was taken by another is fenced: every script checks the lease
first, so its steps are refused instead of running beside the new owner's.
Values are JSON (orjson) written by Python; the scripts copy them verbatim and
never re-encode a float, so times and payloads come back bit for bit.

Key layout (``P`` = prefix, ``C`` = a conversation id, as the client sent it):

=============================  ===========  ==============================================================
key                            type         holds
=============================  ===========  ==============================================================
``P msg:<message id>``         hash         ``data`` (JSON: the message, fingerprint, received_at),
                                            ``fingerprint``, ``conversation_id``, ``arrival``, ``received_at``,
                                            ``attempts``, ``state`` (pending|done|dead), ``last_error``
``P arrivals``                 string       counter: the arrival number of the last accepted message
``P pending``                  sorted set   message id -> arrival number: the messages the bot still owes
``P handled``                  sorted set   message id -> received_at: handled messages, forgotten in that order
``P conv:C``                   hash         ``last`` (last sequence), ``first`` (first retained), ``user``
``P log:C``                    sorted set   reply JSON (with its ``sequence``) -> sequence: the reply log
``P dedupe:C``                 sorted set   dedupe key -> sequence of retained keyed replies (emitted early, callbacks)
``P outbox:C``                 sorted set   sequence -> sequence: replies queued for the webhook
``P delivery:C``               hash         sequence -> JSON (attempts, first/next attempt, last error)
``P heads``                    sorted set   conversation id -> next_attempt_at of its lowest queued reply
``P pinned:C``                 sorted set   dead letter id -> sequence: dead replies, never trimmed
``P letter:<id>``              hash         one dead letter: kind, conversation_id, sequence, error,
                                            attempts, dead_at, source (reply or message JSON), message_id
``P letters``                  sorted set   dead letter id -> creation order (all of them)
``P letters:conv:C``           sorted set   dead letter id -> creation order (one conversation's)
``P letters:kind:K``           sorted set   dead letter id -> creation order (one kind's: reply, message)
``P letters:ord``              string       counter: creation order of the last dead letter
``P owner``                    string       the running sidecar's lease on the prefix (expires unless renewed)
``P probe``                    string       written by each readiness check: a server refusing writes is not ready
=============================  ===========  ==============================================================

Atomicity: each method is one Redis command or one script. Redis runs a
script to the end before anything else, and writes it as one unit to the AOF
and to replicas, so no crash of the sidecar can leave half of a step. The
scripts do every read that can fail before their first write, and Redis
refuses a script for lack of memory only at its first write, so a script
never stops half-way either. Operations are not retried on a lost connection
(a re-run of a script whose answer was lost could count twice); the caller's
own retries apply, and the idempotent steps (accept, append, finish) are safe
to repeat.

Single Redis server only: the scripts derive key names from the prefix
instead of declaring them in KEYS, and no hash tags are used, so Redis
Cluster is not supported. The server must keep everything it is given:
``maxmemory-policy noeviction`` (an evicting policy would silently drop
messages and replies). Durability is the server's: see docs/configuration.md (Redis store).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.config import ConfigError, redact_url
from sidecar.errors import Conflict, StoreRefused, Unavailable
from sidecar.models import (
    AcceptResult,
    DeadLetter,
    Delivery,
    InboundMessage,
    Reply,
    ReplyDraft,
    StoredMessage,
    sidecar_id,
)
from sidecar.observability import Throttle
from sidecar.store.base import ERROR_LIMIT, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "sidecar:"
_LETTER_FIELDS = ("kind", "conversation_id", "sequence", "error", "attempts", "dead_at", "source", "message_id")
_NO_DELIVERY = "sidecar: no queued delivery"
_NO_MESSAGE = "sidecar: unknown message"
# What a server refuses while it cannot write for now, not because the step is wrong:
# out of memory under noeviction, a replica after a failover (READONLY), a failed RDB
# save with stop-writes-on-bgsave-error (MISCONF), still loading its data, a script
# running too long (BUSY). Callers hear "try again" (503 / UNAVAILABLE), as for a
# lost connection, instead of an internal error.
# redis-py gives most of them classes of their own (and strips their code from the
# text); the rest are plain ResponseErrors that start with their code.
_REFUSALS = (OutOfMemoryError, ReadOnlyError, BusyLoadingError, TryAgainError, MasterDownError)
_REFUSAL_CODES = ("MISCONF ", "BUSY ", "NOREPLICAS ")


def _refused(result: object) -> bool:
    if isinstance(result, _REFUSALS):
        return True
    return isinstance(result, ResponseError) and str(result).startswith(_REFUSAL_CODES)


# --- Lua ------------------------------------------------------------------------
# ARGV[1] is always the key prefix (with the lease token after a newline when the
# fence applies: a token among KEYS would fail a prefix-confined ACL user, since
# every declared key must match its patterns). Numbers that are floats (times) reach Redis
# as Python-formatted strings or as numbers decoded from JSON, never through
# Lua's ``..`` (which keeps 14 digits): only integer sequences are concatenated.

_HELPERS = """
local P = ARGV[1]
-- The fence (KEYS[1]: the owner key, when this sidecar holds a lease; its token is in
-- ARGV[1] after the prefix and a newline): a sidecar whose lease lapsed and was taken
-- by another does nothing here, so two can never run the same messages and outbox.
-- A lapsed lease nobody took is no bar.
if KEYS[1] then
  local cut = string.find(P, '\\n', 1, true)
  local token = string.sub(P, cut + 1)
  P = string.sub(P, 1, cut - 1)
  local owner = redis.call('GET', KEYS[1])
  if owner and owner ~= token then return redis.error_reply('NOTOWNER lease held by another sidecar') end
end
local function refresh_head(cid)
  local head = redis.call('ZRANGE', P .. 'outbox:' .. cid, 0, 0)[1]
  if head then
    local state = cjson.decode(redis.call('HGET', P .. 'delivery:' .. cid, head))
    redis.call('ZADD', P .. 'heads', state['next_attempt_at'], cid)
  else
    redis.call('ZREM', P .. 'heads', cid)
  end
end
local function trim(cid, retention, before)
  local conv = P .. 'conv:' .. cid
  local last = tonumber(redis.call('HGET', conv, 'last') or '0')
  local first = tonumber(redis.call('HGET', conv, 'first') or '1')
  local upto = last - retention
  if before then
    -- The log in sequence order, whose created_at grows unless the clock stepped back:
    -- walk it while it is older than before and stop at the first younger reply, like
    -- SQLite; at most 1,000 replies and 4 MiB of them per call (the next pass goes on
    -- from there). A row is a whole reply: first one row (most passes end at the oldest,
    -- still young), then more at a time. 100 rows of 1 MiB per conversation blocked the
    -- server for seconds on passes that expired nothing.
    local seq, budget, bytes, size = math.max(first, upto + 1), 1000, 4194304, 1
    while seq <= last and budget > 0 and bytes > 0 do
      local chunk = redis.call('ZRANGEBYSCORE', P .. 'log:' .. cid, seq, last, 'LIMIT', 0, size)
      if #chunk == 0 then break end
      for _, raw in ipairs(chunk) do
        local reply = cjson.decode(raw)
        if reply['created_at'] >= before then budget = 0 break end
        upto, seq, budget, bytes = reply['sequence'], reply['sequence'] + 1, budget - 1, bytes - #raw
        if budget == 0 or bytes <= 0 then break end
      end
      size = math.min(size * 4, 64)
    end
  end
  if upto < first then return 0 end
  local owed = redis.call('ZRANGE', P .. 'outbox:' .. cid, 0, 0, 'WITHSCORES')[2]
  if owed then upto = math.min(upto, tonumber(owed) - 1) end
  local pinned = redis.call('ZRANGE', P .. 'pinned:' .. cid, 0, 0, 'WITHSCORES')[2]
  if pinned then upto = math.min(upto, tonumber(pinned) - 1) end
  if upto < first then return 0 end
  -- Nor past a reply emitted for a message still pending or dead-lettered: its next run
  -- finds it by its key, whose prefix is the message's id (models.reply_key).
  -- In chunks: a held reply at the start of a long range ends the walk at once.
  local from, held = first, false
  while not held and from <= upto do
    local keyed = redis.call('ZRANGEBYSCORE', P .. 'dedupe:' .. cid, from, upto, 'WITHSCORES', 'LIMIT', 0, 100)
    if #keyed == 0 then break end
    for i = 1, #keyed, 2 do
      local mid = string.match(keyed[i], '^([^@]+)@')
      local state = mid and string.sub(mid, 1, 9) ~= 'callback/' and redis.call('HGET', P .. 'msg:' .. mid, 'state')
      if state == 'pending' or state == 'dead' then
        upto, held = tonumber(keyed[i + 1]) - 1, true
        break
      end
      from = tonumber(keyed[i + 1]) + 1
    end
  end
  if upto < first then return 0 end
  local deleted = redis.call('ZREMRANGEBYSCORE', P .. 'log:' .. cid, '-inf', upto)
  redis.call('ZREMRANGEBYSCORE', P .. 'dedupe:' .. cid, '-inf', upto)
  redis.call('HSET', conv, 'first', upto + 1)
  return deleted
end
local function complete(mid)
  local m = P .. 'msg:' .. mid
  local f = redis.call('HMGET', m, 'state', 'received_at')
  if f[1] then
    redis.call('HSET', m, 'state', 'done')
    redis.call('ZADD', P .. 'handled', f[2] or cjson.decode(redis.call('HGET', m, 'data'))['received_at'], mid)
  end
  redis.call('ZREM', P .. 'pending', mid)
end
local function new_letter(id, kind, cid, seq, err, attempts, dead_at, source, mid)
  local ord = redis.call('INCR', P .. 'letters:ord')
  redis.call('HSET', P .. 'letter:' .. id, 'kind', kind, 'conversation_id', cid, 'sequence', seq, 'error', err,
             'attempts', attempts, 'dead_at', dead_at, 'source', source, 'message_id', mid)
  redis.call('ZADD', P .. 'letters', ord, id)
  redis.call('ZADD', P .. 'letters:conv:' .. cid, ord, id)
  redis.call('ZADD', P .. 'letters:kind:' .. kind, ord, id)
end
local function drop_letter(id, cid)
  redis.call('DEL', P .. 'letter:' .. id)
  redis.call('ZREM', P .. 'letters', id)
  redis.call('ZREM', P .. 'letters:conv:' .. cid, id)
  redis.call('ZREM', P .. 'letters:kind:reply', id)
  redis.call('ZREM', P .. 'letters:kind:message', id)
end
local function reply_at(cid, seq)
  return redis.call('ZRANGEBYSCORE', P .. 'log:' .. cid, seq, seq, 'LIMIT', 0, 1)[1]
end
"""

# ARGV: P, message id, conversation id, user id, fingerprint, data JSON, received_at
_ACCEPT = """
local m = P .. 'msg:' .. ARGV[2]
local found = redis.call('HMGET', m, 'fingerprint', 'data', 'attempts', 'state')
if found[1] then
  if found[1] ~= ARGV[5] then return {'conflict'} end
  return {'duplicate', found[2], found[3], found[4]}
end
local arrival = redis.call('INCR', P .. 'arrivals')
redis.call('HSET', m, 'data', ARGV[6], 'fingerprint', ARGV[5], 'conversation_id', ARGV[3], 'arrival', arrival,
           'received_at', ARGV[7], 'attempts', 0, 'state', 'pending', 'last_error', '')
redis.call('ZADD', P .. 'pending', arrival, ARGV[2])
redis.call('HSET', P .. 'conv:' .. ARGV[3], 'user', ARGV[4])
return {'accepted'}
"""

# ARGV: P, limit, max_bytes. The oldest pending messages within both, then 1 if more
# are pending beyond them, else 0. Bounded here: 1,500 messages of 1 MB in one answer
# timed out (holding the server for seconds), so a large backlog never loaded.
_PENDING_PAGE = """
local out, used, limit, budget = {}, 0, tonumber(ARGV[2]), tonumber(ARGV[3])
for _, id in ipairs(redis.call('ZRANGE', P .. 'pending', 0, limit)) do
  local f = redis.call('HMGET', P .. 'msg:' .. id, 'data', 'attempts')
  used = used + #(f[1] or '')
  if #out >= limit or (#out > 0 and used > budget) then return {out, 1} end
  out[#out + 1] = {id, f[1], f[2]}
end
return {out, 0}
"""

# ARGV: P, message id, error
_RECORD_ATTEMPT = """
local m = P .. 'msg:' .. ARGV[2]
if redis.call('EXISTS', m) == 0 then return 0 end
redis.call('HSET', m, 'last_error', ARGV[3])
return redis.call('HINCRBY', m, 'attempts', 1)
"""

# ARGV: P, before (exclusive), limit
_FORGET = """
local ids = redis.call('ZRANGEBYSCORE', P .. 'handled', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local forgotten = 0
-- One id at a time (no unpack: Lua's limit is a few thousand values), and only a
-- message still done: one replayed since it was handled is pending again.
for _, mid in ipairs(ids) do
  local m = P .. 'msg:' .. mid
  if redis.call('HGET', m, 'state') == 'done' then
    redis.call('DEL', m)
    forgotten = forgotten + 1
  end
  redis.call('ZREM', P .. 'handled', mid)
end
return forgotten
"""

# ARGV: P, conversation id, before, retention
_EXPIRE = """
return trim(ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[3]))
"""

# ARGV: P, message id, error, now, letter id
_DEAD_MESSAGE = f"""
local m = P .. 'msg:' .. ARGV[2]
local f = redis.call('HMGET', m, 'data', 'attempts', 'conversation_id', 'state')
if not f[1] then return redis.error_reply('{_NO_MESSAGE}') end
if f[4] ~= 'pending' then return false end
redis.call('HSET', m, 'state', 'dead', 'last_error', ARGV[3])
redis.call('ZREM', P .. 'pending', ARGV[2])
new_letter(ARGV[5], 'message', f[3], 0, ARGV[3], f[2], ARGV[4], f[1], ARGV[2])
return {{f[1], f[2]}}
"""

# ARGV: P, conversation id, now, outbox (1|0), retention, message id to complete (or ''),
#       fresh delivery state JSON, keyed (1|0), then (dedupe key, reply JSON without its sequence) pairs
_APPEND = """
-- Finishing a message happens once, and only to a pending one.
if ARGV[6] ~= '' and redis.call('HGET', P .. 'msg:' .. ARGV[6], 'state') ~= 'pending' then return {} end
local cid = ARGV[2]
local conv = P .. 'conv:' .. cid
local keys = P .. 'dedupe:' .. cid
local log = P .. 'log:' .. cid
local outbox = ARGV[4] == '1'
local last = tonumber(redis.call('HGET', conv, 'last') or '0')
local appended = {}
-- Replies that finish a message on its first run need no key (it finishes once, and no
-- earlier run emitted under their keys): only the others are keyed.
local unkeyed = ARGV[6] ~= '' and ARGV[8] == '0'
-- Done before the append trims, as in the other stores: its emitted replies are held no more.
if ARGV[6] ~= '' then complete(ARGV[6]) end
for i = 9, #ARGV, 2 do
  if unkeyed or redis.call('ZADD', keys, 'NX', last + 1, ARGV[i]) == 1 then
    last = last + 1
    local reply = '{"sequence":' .. last .. ',' .. string.sub(ARGV[i + 1], 2)
    redis.call('ZADD', log, last, reply)
    if outbox then
      redis.call('ZADD', P .. 'outbox:' .. cid, last, last)
      redis.call('HSET', P .. 'delivery:' .. cid, last, ARGV[7])
    end
    appended[#appended + 1] = reply
  end
end
if #appended > 0 then
  redis.call('HSET', conv, 'last', last)
  if outbox then refresh_head(cid) end
  -- Like the other stores: only a step that appended trims (what a purge or a delivery
  -- unpinned goes with the next reply); one that added nothing changes nothing.
  trim(cid, tonumber(ARGV[5]))
end
return appended
"""

# ARGV: P, now, limit, stepped_after ("" for none)
_DUE = """
local out = {}
local limit = tonumber(ARGV[3])
local heads = redis.call('ZRANGEBYSCORE', P .. 'heads', '-inf', ARGV[2], 'LIMIT', 0, limit)
if ARGV[4] ~= '' and #heads < limit then  -- set before the clock stepped back: due too
  for _, cid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'heads', '(' .. ARGV[4], '+inf', 'LIMIT', 0, limit - #heads)) do
    heads[#heads + 1] = cid
  end
end
for _, cid in ipairs(heads) do
  local seq = redis.call('ZRANGE', P .. 'outbox:' .. cid, 0, 0)[1]
  if seq then
    out[#out + 1] = {cid, redis.call('HGET', P .. 'delivery:' .. cid, seq), reply_at(cid, seq)}
  end
end
return out
"""

# ARGV: P, conversation id, limit
_QUEUED = """
local cid = ARGV[2]
local out = {}
for _, seq in ipairs(redis.call('ZRANGE', P .. 'outbox:' .. cid, 0, tonumber(ARGV[3]) - 1)) do
  out[#out + 1] = {cid, redis.call('HGET', P .. 'delivery:' .. cid, seq), reply_at(cid, seq)}
end
return out
"""

# ARGV: P, conversation id, sequence, retention
_SUCCEEDED = """
local cid = ARGV[2]
redis.call('ZREM', P .. 'outbox:' .. cid, ARGV[3])
redis.call('HDEL', P .. 'delivery:' .. cid, ARGV[3])
refresh_head(cid)
trim(cid, tonumber(ARGV[4]))
return 1
"""

# ARGV: P, conversation id, sequence, delivery state JSON
_FAILED = """
local cid = ARGV[2]
if redis.call('HEXISTS', P .. 'delivery:' .. cid, ARGV[3]) == 1 then
  redis.call('HSET', P .. 'delivery:' .. cid, ARGV[3], ARGV[4])
  refresh_head(cid)
end
return 1
"""

# ARGV: P, conversation id, sequence, attempts, error, now, letter id
_DEAD_REPLY = f"""
local cid, seq = ARGV[2], ARGV[3]
if not redis.call('ZSCORE', P .. 'outbox:' .. cid, seq) then return redis.error_reply('{_NO_DELIVERY}') end
local reply = reply_at(cid, seq)
if not reply then return redis.error_reply('{_NO_DELIVERY}') end
redis.call('ZREM', P .. 'outbox:' .. cid, seq)
redis.call('HDEL', P .. 'delivery:' .. cid, seq)
refresh_head(cid)
redis.call('ZADD', P .. 'pinned:' .. cid, seq, ARGV[7])
new_letter(ARGV[7], 'reply', cid, seq, ARGV[5], ARGV[4], ARGV[6], reply, '')
return reply
"""

# ARGV: P, letter id, fresh delivery state JSON
_REPLAY = """
local id = ARGV[2]
local f = redis.call('HMGET', P .. 'letter:' .. id, 'kind', 'conversation_id', 'sequence', 'message_id')
if not f[1] then return 0 end
local cid = f[2]
if f[1] == 'reply' then
  local seq = f[3]
  if not reply_at(cid, seq) then return redis.error_reply('sidecar: the dead reply is not in the log') end
  redis.call('ZREM', P .. 'pinned:' .. cid, id)
  redis.call('ZADD', P .. 'outbox:' .. cid, seq, seq)
  redis.call('HSET', P .. 'delivery:' .. cid, seq, ARGV[3])
  refresh_head(cid)
else
  local m = P .. 'msg:' .. f[4]
  local g = redis.call('HMGET', m, 'arrival', 'state')
  if not g[1] then return redis.error_reply('sidecar: the dead message is gone') end
  if g[2] ~= 'dead' then  -- a stale letter: the message was replayed and handled since
    drop_letter(id, cid)
    return 0
  end
  redis.call('HSET', m, 'state', 'pending', 'attempts', 0)
  redis.call('ZADD', P .. 'pending', g[1], f[4])
  redis.call('ZREM', P .. 'handled', f[4])
end
drop_letter(id, cid)
return 1
"""

# ARGV: P, then letter ids
_PURGE = """
local removed = 0
for i = 2, #ARGV do
  local f = redis.call('HMGET', P .. 'letter:' .. ARGV[i], 'kind', 'conversation_id', 'message_id')
  if f[1] then
    if f[1] == 'reply' then redis.call('ZREM', P .. 'pinned:' .. f[2], ARGV[i]) end
    -- A message given up for good counts as handled, so the dedupe window forgets it.
    if f[1] == 'message' and redis.call('HGET', P .. 'msg:' .. f[3], 'state') == 'dead' then complete(f[3]) end
    drop_letter(ARGV[i], f[2])
    removed = removed + 1
  end
end
return removed
"""

# ARGV: P, kind (or ''), by conversation (1|0), conversation id, limit, after (a position)
_LIST_LETTERS = f"""
local source = P .. 'letters'
if ARGV[3] == '1' then
  source = P .. 'letters:conv:' .. ARGV[4]
elseif ARGV[2] ~= '' then
  source = P .. 'letters:kind:' .. ARGV[2]  -- no scan past the other kind's letters
end
local limit = tonumber(ARGV[5])
local out = {{}}
-- Paged by position (each letter's own, unique), not by offset: an offset makes every
-- page skip all the ones before it, and a kind that few letters have scanned them all
-- again per page (quadratic: 40,000 letters took 280 ms, Redis blocked meanwhile).
local after = ARGV[6]
while #out < limit do
  local page = redis.call('ZRANGEBYSCORE', source, '(' .. after, '+inf', 'WITHSCORES', 'LIMIT', 0, 256)
  if #page == 0 then break end
  for i = 1, #page, 2 do
    local id = page[i]
    local f = redis.call('HMGET', P .. 'letter:' .. id, {", ".join(repr(f) for f in _LETTER_FIELDS)})
    if f[1] and (ARGV[2] == '' or f[1] == ARGV[2]) and #out < limit then
      table.insert(f, 1, id)
      f[{len(_LETTER_FIELDS) + 2}] = page[i + 1]  -- its position, after the id and the fields
      out[#out + 1] = f
    end
  end
  after = page[#page]
end
return out
"""


# ARGV: P, position after which to go on ('0' at first). Puts a page of letters into
# the per-kind indexes (made by a sidecar without them); the next position, or '' when done.
_INDEX_KINDS = """
local page = redis.call('ZRANGEBYSCORE', P .. 'letters', '(' .. ARGV[2], '+inf', 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #page, 2 do
  local kind = redis.call('HGET', P .. 'letter:' .. page[i], 'kind')
  if kind then redis.call('ZADD', P .. 'letters:kind:' .. kind, page[i + 1], page[i]) end
end
if #page == 0 then return '' end
return page[#page]
"""


def parse_url(url: str) -> tuple[str, str]:
    """Split ``redis://…?prefix=P`` into the URL for redis-py (without ``prefix``) and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in prefix):  # the scripts' ARGV[1] ends the prefix at a newline
        raise RedisStoreError("store (SIDECAR_STORE): the Redis key prefix must not hold control characters")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStoreError(ConfigError):
    """The Redis server cannot be reached or refused us at open; the message never holds the password.

    A ConfigError, like a port already taken: ``sidecar serve`` logs it as "cannot start" and exits 2.
    """


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_PIPELINE = 512
"""At most this many scripts in one pipeline."""

Call = tuple[AsyncScript, list[Any], "asyncio.Future[Any]"]


class RedisStore(Store):
    """One Lua script (or one command) per method on a pooled ``redis.asyncio`` client.

    Scripts go to Redis in pipelines, one in flight at a time: those called
    while one is out wait and leave together as the next (as SQLite's group
    commit does), so under load a round trip, a connection checkout and a
    write serve many messages instead of one. Each script still runs
    atomically and answers its own caller; the pipeline is not a
    transaction, so one script's error is that caller's alone.
    """

    failed_steps_may_land = True  # a dropped connection loses answers, not only requests

    def __init__(
        self,
        url: str,
        *,
        retention: int = 10000,
        max_connections: int = 64,
        exclusive: bool = True,
        lease_seconds: float = 15.0,
    ) -> None:
        """``exclusive`` (the default) holds the prefix's ``owner`` lease while open, so
        that a second sidecar on the same prefix refuses to start; tools that only
        read or clean up beside a running sidecar pass False."""
        self._url, self.prefix = parse_url(url)
        self._exclusive = exclusive
        self._lease_ms = int(lease_seconds * 1000)
        self._owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
        self._lease_task: asyncio.Task[None] | None = None
        self._fenced = False  # the lease was taken by another sidecar: every step is refused
        # KEYS of every script: the owner key, for the fence (its token goes in ARGV[1]);
        # none for tools that only read or clean up beside a running sidecar.
        self._fence: tuple[str, ...] = (self._key("owner"),) if exclusive else ()
        self._argv_prefix = f"{self.prefix}\n{self._owner}" if exclusive else self.prefix
        self.client_name = "sidecar:" + re.sub(r"[^A-Za-z0-9:_.-]", "_", self.prefix)
        self._safe_url = redact_url(self._url)
        # As user info, or as redis-py's ?password= parameter: scrubbed from error texts.
        parts = urlsplit(self._url)
        self._password = parts.password or dict(parse_qsl(parts.query)).get("password", "")
        self._retention = retention
        self._max_connections = max_connections
        self._client: Redis | None = None
        self._calls: list[Call] = []
        self._sender: asyncio.Handle | None = None  # a pipeline is scheduled or in flight
        self._pipelines: set[asyncio.Task[None]] = set()
        self._unreachable_log = Throttle()
        self._refused_log = Throttle()

    def __repr__(self) -> str:
        return f"RedisStore({self._safe_url!r}, prefix={self.prefix!r})"

    # --- plumbing ---------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            pool = BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                decode_responses=True,
                # No automatic retries: a script whose answer was lost may have run.
                retry=Retry(NoBackoff(), 0),
                socket_connect_timeout=5.0,
                # redis-py 8 waits 5 s for an answer by default, older releases for ever (a
                # hung server would hold every step, and a drain, with it): 5 s whichever,
                # unless the URL says (?socket_timeout=).
                **({} if "socket_timeout" in dict(parse_qsl(urlsplit(self._url).query)) else {"socket_timeout": 5.0}),
                # Named in CLIENT LIST: an operator (or a test) can tell this sidecar's connections apart.
                client_name=self.client_name,
            )
        except (ValueError, TypeError) as e:
            raise RedisStoreError(f"store (SIDECAR_STORE): {self._safe_url}: invalid URL: {self._scrub(e)}") from None
        client = Redis(connection_pool=pool)
        try:
            await client.ping()
        except Exception as e:  # noqa: BLE001 - any failure to answer is "cannot connect"
            await client.aclose(close_connection_pool=True)
            raise RedisStoreError(
                f"store (SIDECAR_STORE): {self._safe_url}: cannot connect: {type(e).__name__}: {self._scrub(e)}"
            ) from None
        try:
            cluster = (await client.info("cluster")).get("cluster_enabled")
        except Exception:  # noqa: BLE001 - INFO may be renamed or denied to this user: no verdict
            cluster = None
        if cluster in (1, "1"):
            await client.aclose(close_connection_pool=True)
            # The scripts reach keys they do not declare (a conversation's log, outbox, ...),
            # which a cluster refuses across slots: refused here, not at every message.
            raise RedisStoreError(
                f"store (SIDECAR_STORE): {self._safe_url}: Redis Cluster is not supported;"
                " use a standalone server (with replicas, if you like)"
            )
        self._client = client
        s = client.register_script
        self._renew = s(_RENEW)
        self._release = s(_RELEASE)
        if self._exclusive:
            try:
                await self._take_lease()
            except BaseException:
                self._client = None
                await client.aclose(close_connection_pool=True)
                raise
        self._accept = s(_HELPERS + _ACCEPT)
        self._pending_page = s(_HELPERS + _PENDING_PAGE)
        self._record_attempt = s(_HELPERS + _RECORD_ATTEMPT)
        self._forget = s(_HELPERS + _FORGET)
        self._expire = s(_HELPERS + _EXPIRE)
        self._dead_message = s(_HELPERS + _DEAD_MESSAGE)
        self._append = s(_HELPERS + _APPEND)
        self._due = s(_HELPERS + _DUE)
        self._queued = s(_HELPERS + _QUEUED)
        self._succeeded = s(_HELPERS + _SUCCEEDED)
        self._failed = s(_HELPERS + _FAILED)
        self._dead_reply = s(_HELPERS + _DEAD_REPLY)
        self._replay = s(_HELPERS + _REPLAY)
        self._purge = s(_HELPERS + _PURGE)
        self._list_letters = s(_HELPERS + _LIST_LETTERS)
        if self._exclusive:
            await self._index_letter_kinds()

    async def _index_letter_kinds(self) -> None:
        """Index by kind the dead letters an older sidecar made (before the index, or
        after a rollback to one), a page per script so that Redis is never blocked for
        long, before anything is served. Needed when the kind sets miss letters."""
        r = self._redis()
        letters = await r.zcard(self._key("letters"))
        indexed = sum([await r.zcard(self._key("letters:kind:", kind)) for kind in ("reply", "message")])
        if indexed == letters:
            return
        script = r.register_script(_HELPERS + _INDEX_KINDS)
        after = "0"
        while after := await self._run(script, after):
            pass

    async def _take_lease(self) -> None:
        """Take the prefix's owner lease, waiting out one left by a sidecar that ended
        without closing (it expires within ``lease_seconds``); a live holder renews
        its lease, so after that wait the start is refused."""
        deadline = asyncio.get_running_loop().time() + self._lease_ms / 1000 + 1.0
        while not await self._claim():
            holder = cast(str | None, await self._redis().get(self._key("owner"))) or "a sidecar that just left"
            if asyncio.get_running_loop().time() >= deadline:
                raise RedisStoreError(
                    f"store (SIDECAR_STORE): prefix {self.prefix!r} on {self._safe_url} is in use by another"
                    f" sidecar ({holder}); every sidecar needs a store of its own (a prefix of its own)"
                )
            log.warning("waiting for the store prefix to be free", extra={"prefix": self.prefix, "holder": holder})
            await asyncio.sleep(min(1.0, self._lease_ms / 3000))
        self._lease_task = asyncio.create_task(self._keep_lease(), name="redis-store-lease")

    async def _claim(self) -> bool:
        """Take the lease if nobody holds it."""
        return bool(await self._redis().set(self._key("owner"), self._owner, nx=True, px=self._lease_ms))

    async def _keep_lease(self) -> None:
        """Renew the lease at a third of its life. If it was lost (this process stalled
        past it) and someone else holds it, say so at every renewal: two sidecars on
        one prefix is a misconfiguration that breaks order and exactly-once. Meanwhile
        the scripts' fence refuses this one's steps (503 / UNAVAILABLE, not ready), and
        once the other lets go, the lease is taken again and work resumes."""
        key = self._key("owner")
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                if await self._renew(keys=[key], args=[self._owner, self._lease_ms]):
                    self._fenced = False
                    continue
                if await self._claim():
                    log.warning("store prefix lease had lapsed; taken again", extra={"prefix": self.prefix})
                    self._fenced = False
                    continue
                self._fenced = True
                holder = await self._redis().get(key)
                log.error(
                    "another sidecar holds this store prefix: stop one of them",
                    extra={"prefix": self.prefix, "holder": holder},
                )
            except Exception as e:  # noqa: BLE001 - unreachable for now; the next renewal tries again
                log.warning("renewing the store prefix lease failed", extra={"error": type(e).__name__})

    def _scrub(self, error: BaseException) -> str:
        text = str(error)
        return text.replace(self._password, "***") if self._password else text

    async def close(self) -> None:
        while self._pipelines or self._calls:  # scripts already called still get their answers
            if self._pipelines:
                await asyncio.gather(*self._pipelines, return_exceptions=True)
            else:
                await asyncio.sleep(0)  # the next pipeline is scheduled: let it start
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
            self._lease_task = None
            try:
                await self._release(keys=[self._key("owner")], args=[self._owner])
            except Exception as e:  # noqa: BLE001 - it expires on its own
                log.warning("releasing the store prefix lease failed", extra={"error": type(e).__name__})
        client, self._client = self._client, None
        if client is not None:
            await client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        """A small write: a server that answers but refuses writes (out of memory, a
        replica after a failover, a failed RDB save) is not ready."""
        if self._fenced:  # not ready: every step would be refused
            raise Unavailable("the store is held by another sidecar")
        await self._redis().set(self._key("probe"), "1")

    async def drop(self) -> int:
        """Delete every key under this store's prefix, and nothing else; returns how many.

        For test and benchmark runs that share a database: each cleans up its own prefix.
        """
        client = self._redis()
        pattern = self._glob() + "*"
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        return len(keys)

    def _glob(self) -> str:
        """The prefix as a SCAN pattern that matches it literally."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix)

    def _redis(self) -> Redis:
        if self._client is None:
            raise RuntimeError("the store is not open")
        return self._client

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    async def _run(self, script: AsyncScript, *args: Any) -> Any:
        self._redis()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.append((script, [self._argv_prefix, *args], future))
        if self._sender is None:
            # Not at once: every script called in this turn of the loop joins the
            # pipeline (and while one is out, every script waits for the next).
            self._sender = loop.call_soon(self._send)
        return await future

    def _send(self) -> None:
        """Send what is queued as one pipeline; calls made meanwhile wait for the next one."""
        calls, self._calls = self._calls[:_PIPELINE], self._calls[_PIPELINE:]
        if not calls:
            self._sender = None
            return
        task = asyncio.ensure_future(self._pipeline(calls))
        self._pipelines.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._pipelines.discard(task)
        self._sender = asyncio.get_running_loop().call_soon(self._send)

    async def _pipeline(self, calls: list[Call]) -> None:
        try:
            results = await self._execute(calls)
            # Scripts unknown to the server (restarted, or SCRIPT FLUSH) did not run:
            # load them and run just those again, in their order.
            missing = [
                (c, i) for i, (c, r) in enumerate(zip(calls, results, strict=True)) if isinstance(r, NoScriptError)
            ]
            if missing:
                for script in {c[0] for c, _ in missing}:
                    script.sha = await self._redis().script_load(script.script)
                for (_, i), result in zip(missing, await self._execute([c for c, _ in missing]), strict=True):
                    results[i] = result
        except BusyLoadingError:
            # A ConnectionError to redis-py, but the server answered: it is loading its data
            # and ran nothing. A refusal (503 / UNAVAILABLE), not a possibly lost answer.
            results = [StoreRefused("the store is loading its data; try again")] * len(calls)
        except (RedisConnectionError, RedisTimeoutError) as e:
            # Unreachable for now: callers hear "try again" (503 / UNAVAILABLE) rather than
            # an internal error. A script may have run before the connection dropped; a
            # retry of it is deduplicated like any other.
            if pipelines := self._unreachable_log.due():  # one line per 10 s, not one per pipeline
                log.warning("redis store unreachable", extra={"error": type(e).__name__, "pipelines": pipelines})
            results = [Unavailable("the store is unreachable; try again")] * len(calls)
        except Exception as e:  # noqa: BLE001 - anything else: every caller hears of it
            results = [e] * len(calls)
        except BaseException:
            for _, _, future in calls:  # cancelled (the loop is closing): no caller waits forever
                future.cancel()
            raise
        for (_, _, future), result in zip(calls, results, strict=True):
            if future.done():  # the caller was cancelled; its script ran (or not) all the same
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, calls: list[Call]) -> list[Any]:
        fence = self._fence
        async with self._redis().pipeline(transaction=False) as pipe:
            for script, args, _ in calls:
                pipe.evalsha(script.sha, len(fence), *fence, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        fenced = [i for i, r in enumerate(results) if isinstance(r, ResponseError) and "NOTOWNER" in str(r)]
        if fenced:
            if not self._fenced:
                log.error(
                    "another sidecar took this store prefix: refusing every store step until it is free again",
                    extra={"prefix": self.prefix},
                )
            self._fenced = True
            for i in fenced:
                results[i] = StoreRefused("the store is held by another sidecar; try again")
        refused = [i for i, r in enumerate(results) if _refused(r)]
        if refused:
            if pipelines := self._refused_log.due():
                error = self._scrub(results[refused[0]])
                log.error("redis store refuses writes", extra={"error": error[:300], "pipelines": pipelines})
            for i in refused:
                results[i] = StoreRefused("the store cannot write now; try again")
        return results

    # --- inbound messages ---------------------------------------------------------

    async def accept(self, message: InboundMessage, *, now: float) -> AcceptResult:
        key = sidecar_id("message", message.conversation_id, message.message_id)
        fingerprint = message.fingerprint()
        data = orjson.dumps(
            {
                "conversation_id": message.conversation_id,
                "message_id": message.message_id,
                "user_id": message.user_id,
                "type": message.type,
                "text": message.text,
                "payload": message.payload,
                "fingerprint": fingerprint,
                "received_at": now,
            }
        )
        answer = await self._run(self._accept, key, message.conversation_id, message.user_id, fingerprint, data, now)
        if answer[0] == "conflict":
            raise Conflict()
        if answer[0] == "duplicate":
            return AcceptResult(_message(key, answer[1], answer[2]), duplicate=True, pending=answer[3] == "pending")
        stored = StoredMessage(id=key, message=message, fingerprint=fingerprint, received_at=now)
        return AcceptResult(stored, duplicate=False)

    async def known(self, message: InboundMessage) -> AcceptResult | None:
        key = sidecar_id("message", message.conversation_id, message.message_id)
        fields = await _reached(
            self._redis().hmget(self._key("msg:", key), ["fingerprint", "data", "attempts", "state"])
        )
        fingerprint, data, attempts, state = cast(list[str | None], fields)
        if fingerprint is None or data is None:
            return None
        if fingerprint != message.fingerprint():
            raise Conflict()
        return AcceptResult(_message(key, data, attempts), duplicate=True, pending=state == "pending")

    async def pending_page(self, limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        rows, more = await self._run(self._pending_page, limit, max_bytes)
        return [_message(row[0], row[1], row[2]) for row in rows], bool(more)

    async def record_attempt(self, message_id: str, error: str) -> int:
        return int(await self._run(self._record_attempt, message_id, error[:ERROR_LIMIT]))

    async def finish_message(
        self,
        message_id: str,
        conversation_id: str,
        drafts: Sequence[ReplyDraft],
        *,
        now: float,
        outbox: bool,
        keyed: bool = True,
    ) -> list[Reply]:
        return await self._append_replies(
            conversation_id, drafts, now=now, outbox=outbox, complete=message_id, keyed=keyed
        )

    async def forget_messages(self, before: float, limit: int) -> int:
        if limit <= 0:
            return 0
        return int(await self._run(self._forget, before, limit))

    async def expire_replies(self, before: float, after: str, limit: int) -> tuple[int, str]:
        if limit <= 0:
            return 0, ""
        # SCAN's cursor is the pass's cursor: it visits every conversation once, whatever
        # is added or trimmed meanwhile, and comes back to 0 at the end.
        cursor, keys = await _reached(self._redis().scan(int(after or 0), match=self._glob() + "conv:*", count=limit))
        head = len(self.prefix) + len("conv:")
        done = await asyncio.gather(*(self._run(self._expire, k[head:], before, self._retention) for k in keys))
        return sum(int(n) for n in done), "" if cursor == 0 else str(cursor)

    async def dead_letter_message(self, message_id: str, error: str, *, now: float) -> DeadLetter | None:
        letter_id = str(uuid.uuid4())
        error = error[:ERROR_LIMIT]
        try:
            found = await self._run(self._dead_message, message_id, error, now, letter_id)
        except ResponseError as e:
            if _NO_MESSAGE in str(e):
                raise KeyError(message_id) from None
            raise
        if not found:  # no longer pending: nothing changed
            return None
        data, attempts = found
        m = _message(message_id, data, attempts).message
        return DeadLetter(
            id=letter_id,
            kind="message",
            conversation_id=m.conversation_id,
            sequence=0,
            body=m.api_json(),
            error=error,
            attempts=int(attempts),
            dead_at=now,
            extra={"message_id": message_id},
        )

    # --- reply log ----------------------------------------------------------------

    async def append_replies(
        self, conversation_id: str, drafts: Sequence[ReplyDraft], *, now: float, outbox: bool
    ) -> list[Reply]:
        return await self._append_replies(conversation_id, drafts, now=now, outbox=outbox, complete="")

    async def _append_replies(
        self,
        conversation_id: str,
        drafts: Sequence[ReplyDraft],
        *,
        now: float,
        outbox: bool,
        complete: str,
        keyed: bool = True,
    ) -> list[Reply]:
        args: list[Any] = [
            conversation_id, now, "1" if outbox else "0", self._retention, complete, _fresh(now), "1" if keyed else "0"
        ]  # fmt: skip
        for d in drafts:
            body = orjson.dumps(
                {
                    "type": d.type,
                    "payload": d.payload,
                    "bot_user_id": d.bot_user_id,
                    "bot_message_id": d.bot_message_id,
                    "bot_conversation_id": d.bot_conversation_id,
                    "user_id": d.user_id,
                    "in_reply_to": d.in_reply_to,
                    "created_at": now,
                }
            )
            args += [d.dedupe_key, body]
        rows = await self._run(self._append, *args)
        return [_reply(conversation_id, row) for row in rows]

    async def replies_after(
        self, conversation_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Reply]:
        if limit <= 0:
            return []
        key = self._key("log:", conversation_id)
        if max_bytes is None:
            rows = await _reached(self._redis().zrangebyscore(key, f"({after}", "+inf", start=0, num=limit))
            return [_reply(conversation_id, cast(str, row)) for row in rows]
        # With a budget, a few rows at a time: 256 replies of 4 MiB must not all cross the
        # wire (and sit in memory) to keep one MiB of them. Each row is the whole reply as
        # JSON: a little more than its payload, never less.
        page: list[Reply] = []
        used, chunk = 0, min(limit, 16)
        while len(page) < limit:
            since = page[-1].sequence if page else after  # by sequence, not offset: a trim may run between
            rows = await _reached(
                self._redis().zrangebyscore(key, f"({since}", "+inf", start=0, num=min(chunk, limit - len(page)))
            )
            for i, row in enumerate(rows):
                used += len(cast(str, row).encode())
                if page and used > max_bytes:
                    return page
                reply = _reply(conversation_id, cast(str, row))
                if i == 0 and page and reply.sequence != page[-1].sequence + 1:
                    # A trim ran between two reads (each read alone is one snapshot, without
                    # gaps): the page ends here, and the stream's next read finds the gap at
                    # its start and says so (OUT_OF_RANGE) instead of skipping replies.
                    return page
                page.append(reply)
            if len(rows) < chunk:
                return page
            chunk = min(chunk * 4, 256)  # small replies: fewer round trips as the page grows
        return page

    async def _conversation(self, conversation_id: str) -> list[str | None]:
        fields = await _reached(self._redis().hmget(self._key("conv:", conversation_id), ["last", "first", "user"]))
        return cast(list[str | None], fields)

    async def last_sequence(self, conversation_id: str) -> int:
        return int((await self._conversation(conversation_id))[0] or 0)

    async def first_retained_sequence(self, conversation_id: str) -> int:
        return int((await self._conversation(conversation_id))[1] or 1)

    async def conversation_user(self, conversation_id: str) -> str | None:
        return (await self._conversation(conversation_id))[2] or None

    # --- webhook outbox -------------------------------------------------------------

    async def due_deliveries(self, now: float, limit: int, stepped_after: float | None = None) -> list[Delivery]:
        if limit <= 0:
            return []
        rows = await self._run(self._due, now, limit, "" if stepped_after is None else repr(stepped_after))
        return [_delivery(*row) for row in rows]

    async def queued_deliveries(self, conversation_id: str, limit: int) -> list[Delivery]:
        if limit <= 0:
            return []
        rows = await self._run(self._queued, conversation_id, limit)
        return [_delivery(*row) for row in rows]

    async def next_due_at(self, after: float) -> float | None:
        heads = await _reached(
            self._redis().zrangebyscore(self._key("heads"), f"({after!r}", "+inf", start=0, num=1, withscores=True)
        )
        return float(cast(tuple[str, float], heads[0])[1]) if heads else None

    async def delivery_succeeded(self, conversation_id: str, sequence: int) -> None:
        await self._run(self._succeeded, conversation_id, sequence, self._retention)

    async def delivery_failed(
        self,
        conversation_id: str,
        sequence: int,
        *,
        attempts: int,
        first_attempt_at: float,
        next_attempt_at: float,
        error: str,
    ) -> None:
        state = orjson.dumps(
            {
                "attempts": attempts,
                "first_attempt_at": first_attempt_at,
                "next_attempt_at": next_attempt_at,
                "last_error": error[:ERROR_LIMIT],
            }
        )
        await self._run(self._failed, conversation_id, sequence, state)

    async def delivery_dead(
        self, conversation_id: str, sequence: int, *, attempts: int, error: str, now: float
    ) -> DeadLetter:
        letter_id = str(uuid.uuid4())
        error = error[:ERROR_LIMIT]
        try:
            row = await self._run(self._dead_reply, conversation_id, sequence, attempts, error, now, letter_id)
        except ResponseError as e:
            if _NO_DELIVERY in str(e):
                raise KeyError((conversation_id, sequence)) from None
            raise
        reply = _reply(conversation_id, row)
        return DeadLetter(
            id=letter_id,
            kind="reply",
            conversation_id=conversation_id,
            sequence=sequence,
            body=reply.webhook_body(),
            error=error,
            attempts=attempts,
            dead_at=now,
            extra={"webhook_id": reply.webhook_id},
        )

    # --- dead letters ------------------------------------------------------------

    async def list_dead_letters(
        self, *, kind: str | None = None, conversation_id: str | None = None, limit: int = 100, after: int = 0
    ) -> list[DeadLetter]:
        if limit <= 0:
            return []
        by_conversation = "0" if conversation_id is None else "1"
        args = (kind or "", by_conversation, conversation_id or "", limit, after)
        rows = await self._run(self._list_letters, *args)
        n = len(_LETTER_FIELDS)
        return [replace(_letter(row[0], row[1 : n + 1]), position=int(row[n + 1])) for row in rows]

    async def backlog(self) -> tuple[int, int]:
        letters = await _reached(self._redis().zcard(self._key("letters")))
        owed = await _reached(self._redis().zcard(self._key("heads")))  # one head per conversation owed
        return int(letters), int(owed)

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        fields = cast(
            list[str | None],
            await _reached(self._redis().hmget(self._key("letter:", dead_letter_id), list(_LETTER_FIELDS))),
        )
        return _letter(dead_letter_id, fields) if fields[0] is not None else None

    async def replay_dead_letter(self, dead_letter_id: str, *, now: float) -> bool:
        return bool(await self._run(self._replay, dead_letter_id, _fresh(now)))

    async def purge_dead_letters(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return int(await self._run(self._purge, *ids))


# --- decoding -----------------------------------------------------------------------


def _fresh(now: float) -> bytes:
    """The delivery state of a reply (re-)entering the outbox: due now, no attempts."""
    return orjson.dumps({"attempts": 0, "first_attempt_at": None, "next_attempt_at": now, "last_error": ""})


def _message(message_id: str, data: str, attempts: str | int | None) -> StoredMessage:
    d = orjson.loads(data)
    inbound = InboundMessage(d["user_id"], d["message_id"], d["conversation_id"], d["type"], d["text"], d["payload"])
    return StoredMessage(
        id=message_id,
        message=inbound,
        fingerprint=d["fingerprint"],
        received_at=d["received_at"],
        attempts=int(attempts or 0),
    )


def _reply(conversation_id: str, data: str) -> Reply:
    d = orjson.loads(data)
    return Reply(
        conversation_id=conversation_id,
        sequence=d["sequence"],
        type=d["type"],
        payload=d["payload"],
        bot_user_id=d["bot_user_id"],
        bot_message_id=d["bot_message_id"],
        bot_conversation_id=d["bot_conversation_id"],
        user_id=d["user_id"],
        in_reply_to=d["in_reply_to"],
        created_at=d["created_at"],
    )


def _delivery(conversation_id: str, state: str, reply: str) -> Delivery:
    s = orjson.loads(state)
    return Delivery(
        reply=_reply(conversation_id, reply),
        attempts=s["attempts"],
        first_attempt_at=s["first_attempt_at"],
        next_attempt_at=s["next_attempt_at"],
        last_error=s["last_error"],
    )


def _letter(letter_id: str, fields: Sequence[str | None]) -> DeadLetter:
    kind, conversation_id, sequence, error, attempts, dead_at, source, message_id = fields
    assert kind is not None and conversation_id is not None and source is not None
    body: dict[str, Any]
    extra: dict[str, Any]
    if kind == "reply":
        reply = _reply(conversation_id, source)
        body, extra = reply.webhook_body(), {"webhook_id": reply.webhook_id}
    else:
        body, extra = _message(message_id or "", source, 0).message.api_json(), {"message_id": message_id}
    return DeadLetter(
        id=letter_id,
        kind=kind,
        conversation_id=conversation_id,
        sequence=int(sequence or 0),
        body=body,
        error=error or "",
        attempts=int(attempts or 0),
        dead_at=float(dead_at or 0.0),
        extra=extra,
    )


async def _reached(awaitable: Awaitable[T]) -> T:
    """A direct read's result. An unreachable Redis is Unavailable (503 / UNAVAILABLE),
    as for scripts in _run, not redis-py's error with its host and port."""
    try:
        return await awaitable
    except BusyLoadingError:  # a ConnectionError to redis-py, but a refusal: see _REFUSALS
        raise StoreRefused("the store is loading its data; try again") from None
    except (RedisConnectionError, RedisTimeoutError):
        raise Unavailable("the store is unreachable; try again") from None
    except ResponseError as e:
        if _refused(e):  # BUSY, MASTERDOWN, ...: as for scripts, "try again", not a 500
            raise StoreRefused("the store refuses requests for now; try again") from None
        raise
