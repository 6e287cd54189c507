"""User histories and the event stream in Redis (key names shared with the nightly job)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from remi_core.redis_keys import EVENTS_STREAM, history_key
from service.errors import HistoryConflict, RedisUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float


def _format_timestamp(ts: float) -> str:
    # Whole seconds stay "1700000000" rather than "1700000000.0", the form the nightly job expects.
    return str(int(ts)) if float(ts).is_integer() else repr(float(ts))


# MULTI/EXEC does not roll back when one command fails at run time (WRONGTYPE), so the writes
# before and after it would land and a client retry would duplicate them. Checking every key's
# type inside the script, before the first write, makes a bad key reject the whole batch; a
# script runs atomically and in one round trip, with no WATCH retries on the hot stream key.
# KEYS[1]: the stream; KEYS[2..]: the users' lists, each once, in first-seen order.
# ARGV: history cap, stream maxlen ("" = untrimmed), then per event: its list's index in KEYS,
# user_id, item_id, timestamp. Returns nil, or {key, its type} for the first key of a wrong type.
_APPEND_SCRIPT = """
for i, key in ipairs(KEYS) do
  local found = redis.call('TYPE', key)['ok']
  local wanted = (i == 1) and 'stream' or 'list'
  if found ~= 'none' and found ~= wanted then
    return {key, found}
  end
end
local cap = tonumber(ARGV[1])
local maxlen = ARGV[2]
for j = 3, #ARGV, 4 do
  redis.call('RPUSH', KEYS[tonumber(ARGV[j])], ARGV[j + 2])
  if maxlen == '' then
    redis.call('XADD', KEYS[1], '*',
      'user_id', ARGV[j + 1], 'item_id', ARGV[j + 2], 'timestamp', ARGV[j + 3])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
      'user_id', ARGV[j + 1], 'item_id', ARGV[j + 2], 'timestamp', ARGV[j + 3])
  end
end
for i = 2, #KEYS do  -- trim once per user, after all of its appends
  redis.call('LTRIM', KEYS[i], -cap, -1)
end
return false
"""


def _is_wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


class HistoryStore:
    """Capped per-user lists plus the stream, over one pooled asyncio Redis client.

    A dead connection is dropped by the pool and the next command dials again, so the store
    recovers by itself when Redis comes back; the single immediate retry covers the first
    command after a Redis restart, which otherwise fails on a stale pooled connection.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        history_cap: int,
        stream_maxlen: int | None = None,
    ) -> None:
        self.url = url
        self.history_cap = history_cap
        self.stream_maxlen = stream_maxlen
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # The library default retries 10 times with backoff: seconds of waiting on a dead
            # Redis. One immediate retry is enough to replace a stale connection.
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
            # Bytes a foreign writer stored that are not UTF-8 decode to U+FFFD and so count as
            # unknown ids, instead of failing the request. Outgoing strings are always valid
            # UTF-8 (the schemas refuse lone surrogates), so encoding is unaffected.
            encoding_errors="replace",
        )
        self._append_script = self._client.register_script(_APPEND_SCRIPT)

    async def close(self) -> None:
        await self._client.aclose()

    async def append(self, events: Sequence[Event]) -> None:
        """Append events to each user's capped list and to the stream, atomically (one Lua
        script): either the whole batch is written or, when a key has the wrong type
        (HistoryConflict), nothing is.

        Delivery to the stream is at least once: a timeout after the script reached Redis can
        make a client retry and add the batch twice, so the nightly job should tolerate
        duplicates.
        """
        if not events:
            return
        # A dict keeps first-seen order: each user's list is KEYS[slot], listed once.
        user_of = {history_key(event.user_id): event.user_id for event in events}
        slot = {key: i for i, key in enumerate(user_of, start=2)}  # Lua is 1-based; 1 = stream
        args: list[str | int] = [
            self.history_cap,
            "" if self.stream_maxlen is None else self.stream_maxlen,  # "": keep everything
        ]
        for event in events:
            args += [
                slot[history_key(event.user_id)],
                event.user_id,
                event.item_id,
                _format_timestamp(event.timestamp),
            ]
        try:
            wrong = await self._append_script(keys=[EVENTS_STREAM, *user_of], args=args)
        except (RedisError, OSError) as exc:
            raise self._unavailable("store events", exc) from None
        if wrong is not None:
            key, found = wrong
            if key == EVENTS_STREAM:
                what, wanted = "the events stream", "stream"
            else:
                what, wanted = f"the history of user {user_of[key]!r}", "list"
            raise self._conflict(
                f"cannot store events: Redis key {key!r} ({what}) holds a {found}, not a "
                f"{wanted}; nothing was stored. Fix or delete that key, then send the events again"
            )

    async def histories(self, user_ids: Sequence[str], limit: int) -> list[list[str]]:
        """The last `limit` items of each user's history, oldest first ([] for unknown users).

        Raises HistoryConflict when a user's key holds something other than a list.
        """
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.lrange(history_key(user_id), -limit, -1)
                # Errors come back in place, so a wrong-type key can be told from an outage and
                # named; any other error still means Redis is unavailable.
                replies = await pipe.execute(raise_on_error=False)
            for user_id, reply in zip(user_ids, replies, strict=True):
                if not isinstance(reply, Exception):
                    continue
                if not _is_wrong_type(reply):
                    raise reply
                key = history_key(user_id)
                raise self._conflict(
                    f"cannot read the history of user {user_id!r}: Redis key {key!r} is not a "
                    "list. Fix or delete that key"
                )
        except (RedisError, OSError) as exc:
            raise self._unavailable("read user histories", exc) from None
        return [list(items) for items in replies]

    async def ping(self) -> str | None:
        """None when Redis answers, else why not."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _conflict(self, message: str) -> HistoryConflict:
        # Someone else's data in our key space needs an operator, not just the client, to see it.
        log.warning("redis key conflict: %s", message)
        return HistoryConflict(message)

    def _unavailable(self, action: str, exc: BaseException) -> RedisUnavailable:
        log.warning("redis unavailable (%s): %s", action, exc)
        return RedisUnavailable(
            f"cannot {action}: Redis at {_redact(self.url)} is unavailable "
            f"({type(exc).__name__}: {exc})"
        )


def _redact(url: str) -> str:
    """Hide the password of a Redis URL before it goes into a message: the one in the userinfo
    (`user:pass@`) and the `password=` query parameter redis-py also accepts."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable Redis URL>"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")  # rpartition: passwords may hold an "@"
    if at:
        username, colon, _ = userinfo.partition(":")
        netloc = f"{username}:***@{host}" if username and colon else f"{username or '***'}@{host}"
    query = "&".join(
        f"{name}=***" if unquote(name).lower() == "password" else f"{name}{sep}{value}"
        for name, sep, value in (field.partition("=") for field in parts.query.split("&"))
    )
    # Rebuilt by hand: urlunsplit would turn "unix:///tmp/r.sock" into "unix:/tmp/r.sock".
    redacted = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        redacted += f"?{query}"
    if parts.fragment:
        redacted += f"#{parts.fragment}"
    return redacted
