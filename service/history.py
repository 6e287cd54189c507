"""User histories and the event stream in Redis (key names shared with the nightly job)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from remi_core.events import EVENTS_STREAM, history_key
from service.errors import RedisUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float


def _format_timestamp(ts: float) -> str:
    # Whole seconds stay "1700000000" rather than "1700000000.0", the form the nightly job expects.
    return str(int(ts)) if float(ts).is_integer() else repr(float(ts))


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
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def append(self, events: Sequence[Event]) -> None:
        """Append events to each user's capped list and to the stream, atomically (MULTI/EXEC).

        Delivery to the stream is at least once: a timeout after EXEC reached Redis can make a
        client retry and add the batch twice, so the nightly job should tolerate duplicates.
        """
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                touched: dict[str, None] = {}
                for event in events:
                    key = history_key(event.user_id)
                    pipe.rpush(key, event.item_id)
                    touched[key] = None
                    fields = {
                        "user_id": event.user_id,
                        "item_id": event.item_id,
                        "timestamp": _format_timestamp(event.timestamp),
                    }
                    # maxlen=None leaves the stream untrimmed for the nightly job.
                    pipe.xadd(EVENTS_STREAM, fields, maxlen=self.stream_maxlen, approximate=True)
                for key in touched:  # trim once per user, after all of its appends
                    pipe.ltrim(key, -self.history_cap, -1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable("store events", exc) from None

    async def histories(self, user_ids: Sequence[str], limit: int) -> list[list[str]]:
        """The last `limit` items of each user's history, oldest first ([] for unknown users)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.lrange(history_key(user_id), -limit, -1)
                return [list(items) for items in await pipe.execute()]
        except (RedisError, OSError) as exc:
            raise self._unavailable("read user histories", exc) from None

    async def ping(self) -> str | None:
        """None when Redis answers, else why not."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _unavailable(self, action: str, exc: BaseException) -> RedisUnavailable:
        log.warning("redis unavailable (%s): %s", action, exc)
        return RedisUnavailable(
            f"cannot {action}: Redis at {_redact(self.url)} is unavailable "
            f"({type(exc).__name__}: {exc})"
        )


def _redact(url: str) -> str:
    """Drop any password from a Redis URL before it goes into a message."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
