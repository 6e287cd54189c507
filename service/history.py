"""User histories and the event stream in Redis (key names shared with the nightly job)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from redis import asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from remi_core.redis_keys import (
    EVENTS_STREAM,
    HISTORY_TIMES_PREFIX,
    history_key,
    history_times_key,
    redis_url_problem,
)
from service.errors import HistoryConflict, RedisUnavailable
from service.redact import redact_url, scrub_secrets
from service.schemas import MAX_ID_LENGTH

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
# A script that starts after its deadline (Redis's own clock, microseconds) writes nothing: the
# client has given up by then and answered 503, which must mean "not stored" (e.g. a Redis
# stopped with SIGSTOP runs the queued script when it resumes, long after the 503).
# The request's random token, set only when the batch is written, makes the client's one retry
# after a lost reply (the connection broke) find the batch written instead of writing it twice;
# it is looked up before the deadline, since a retry may well start after it.
# The stream is written first: a script stops at a failing command without undoing the ones
# before it, and the one write that can fail past the type checks is the first XADD (a stream
# whose ids are used up, a read-only replica, a write refused for memory), so an error reply
# means nothing was written. A Redis user's ACL may deny any command or key of the script: on
# Redis 7 each is checked (acl_check_cmd) before the first write too.
# A user's list stays in timestamp order, oldest first, whatever order events arrive in (a
# client's offline batch, a request's events out of order): its companion list holds each
# entry's timestamp. A request's events for a user are sorted; when the oldest is older than
# the newest entry, the entries newer than it come off the tail once and are merged with the
# events (the cost: the list plus the events, once per user and request; in order, one
# LINDEX). A list without a matching companion (written before it existed, or by hand) counts
# as older than any event, as does a companion entry that is no number. Equal timestamps keep
# arrival order. The cap then trims the oldest by timestamp.
# KEYS[1]: the stream; KEYS[2]: the request's token; KEYS[3..]: per user, in first-seen order,
# its list and then its list of timestamps. ARGV: deadline, token lifetime in ms, history cap,
# stream maxlen ("" = untrimmed), then per event: its list's index in KEYS, user_id, item_id,
# timestamp.
# Returns nil, 'expired', 'done' (already written), or {key, its type} for a key of a wrong type.
_APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'done'
end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[1]) then
  return 'expired'
end
for i, key in ipairs(KEYS) do
  local found = redis.call('TYPE', key)['ok']
  local wanted = (i == 1) and 'stream' or 'list'
  if i ~= 2 and found ~= 'none' and found ~= wanted then
    return {key, found}
  end
end
if redis.acl_check_cmd then  -- Redis 7: a command this user may not run fails here, not midway
  local function denied(...)
    if not redis.acl_check_cmd(...) then
      return redis.error_reply('NOPERM this user may not run ' .. table.concat({...}, ' '))
    end
  end
  local refused = denied('XADD', KEYS[1], '*', 'f', 'v') or denied('SET', KEYS[2], '1', 'PX', '1')
  for i = 3, #KEYS do
    refused = refused or denied('LLEN', KEYS[i]) or denied('LINDEX', KEYS[i], '-1')
      or denied('LRANGE', KEYS[i], '0', '-1') or denied('RPUSH', KEYS[i], 'v')
      or denied('LTRIM', KEYS[i], '0', '-1') or denied('DEL', KEYS[i])
  end
  if refused then
    return refused
  end
end
local cap = tonumber(ARGV[3])
local maxlen = ARGV[4]
local function rpush(key, values)  -- in slices: unpack takes a few thousand values at most
  for s = 1, #values, 1000 do
    redis.call('RPUSH', key, unpack(values, s, math.min(s + 999, #values)))
  end
end
for j = 5, #ARGV, 4 do
  if maxlen == '' then
    redis.call('XADD', KEYS[1], '*',
      'user_id', ARGV[j + 1], 'item_id', ARGV[j + 2], 'timestamp', ARGV[j + 3])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
      'user_id', ARGV[j + 1], 'item_id', ARGV[j + 2], 'timestamp', ARGV[j + 3])
  end
end
local pending = {}  -- per user (its list's slot): its events, oldest first
for j = 5, #ARGV, 4 do
  local slot = tonumber(ARGV[j])
  pending[slot] = pending[slot] or {}
  table.insert(pending[slot], {tonumber(ARGV[j + 3]), j, ARGV[j + 2], ARGV[j + 3]})
end
local function when(stamp)  -- a foreign entry that is no number counts as oldest
  return tonumber(stamp) or 0
end
for slot, events in pairs(pending) do
  table.sort(events, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]  -- equal timestamps: arrival order
  end)
  local items, times = KEYS[slot], KEYS[slot + 1]
  local size = redis.call('LLEN', items)
  if redis.call('LLEN', times) ~= size then  -- no timestamps: all older than any event
    redis.call('DEL', times)
    local zeros = {}
    for k = 1, size do
      zeros[k] = '0'
    end
    rpush(times, zeros)
  end
  local tail_items, tail_times = {}, {}
  local newest = redis.call('LINDEX', times, -1)
  if newest and when(newest) > events[1][1] then
    -- Entries newer than the oldest event come off once and merge with the events. Only the
    -- list's tail is read, twice as much at a time until it reaches an older entry: a slightly
    -- late event at a cap of 10^6 read every timestamp (a second of Redis blocked for all).
    local read, tail, stay = 64, {}, 0
    repeat
      tail = redis.call('LRANGE', times, -read, -1)
      stay = #tail
      while stay > 0 and when(tail[stay]) > events[1][1] do
        stay = stay - 1
      end
      read = read * 2
    until stay > 0 or #tail == size
    local keep = size - #tail + stay
    tail_items = redis.call('LRANGE', items, keep, -1)
    for k = stay + 1, #tail do
      tail_times[#tail_times + 1] = tail[k]
    end
    if keep == 0 then  -- LTRIM 0 -1 would keep everything
      redis.call('DEL', items, times)
    else
      redis.call('LTRIM', items, 0, keep - 1)
      redis.call('LTRIM', times, 0, keep - 1)
    end
  end
  local merged_items, merged_times = {}, {}
  local a, b = 1, 1
  while a <= #tail_items or b <= #events do
    -- A stored entry goes first on equal timestamps: it arrived first.
    local n = #merged_items + 1
    if b > #events or (a <= #tail_items and when(tail_times[a]) <= events[b][1]) then
      merged_items[n], merged_times[n] = tail_items[a], tail_times[a]
      a = a + 1
    else
      merged_items[n], merged_times[n] = events[b][3], events[b][4]
      b = b + 1
    end
  end
  rpush(items, merged_items)
  rpush(times, merged_times)
  redis.call('LTRIM', items, -cap, -1)
  redis.call('LTRIM', times, -cap, -1)
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return false
"""
# The end of a 503's detail when an /events write may have happened (docs/serving.md).
UNKNOWN_OUTCOME = "the events may or may not have been stored"
# True in a request's task while its /events script may be running with no reply yet, so that
# a request cancelled then (at the graceful shutdown's deadline) is not told "send it again".
WRITE_IN_FLIGHT: ContextVar[bool] = ContextVar("remi_events_write_in_flight", default=False)
# Where the tokens of recent /events writes live (a few seconds each).
_TOKEN_PREFIX = "remi:append-token:"


def _is_wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def check_redis_url(url: str) -> None:
    """ValueError, the password hidden, for a URL the connection pool cannot parse (a port that
    is no number, an option of the wrong type): Settings refuse it at start, before any worker."""
    try:
        parse_url(url)
        if problem := redis_url_problem(url, aioredis.BlockingConnectionPool):
            raise ValueError(problem)
    except ValueError as exc:  # redis-py's messages may quote parts of the URL
        reason = scrub_secrets(str(exc), url)
        # A password piece shorter than scrub_secrets looks for ("ab" of ab/cd): any quoted
        # value found in the URL's userinfo is hidden (an option's name stays).
        userinfo = url.partition("://")[2].rpartition("@")[0]
        reason = re.sub(
            r"'([^']*)'", lambda m: "'***'" if m[1] and m[1] in userinfo else m[0], reason
        )
        raise ValueError(f"invalid Redis URL {redact_url(url)}: {reason}") from None


class HistoryStore:
    """Capped per-user lists plus the stream, over one pooled asyncio Redis client.

    Every operation gets ONE budget of `timeout_s` for all of its round trips together, and a
    timeout is never retried: a hung Redis costs one timeout, not a multiple of it. A broken
    connection is retried once at once, which covers the first command after a Redis restart
    (it otherwise fails on a stale pooled connection).
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        history_cap: int,
        stream_maxlen: int | None = None,
        max_connections: int = 100,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.history_cap = history_cap
        self.stream_maxlen = stream_maxlen
        check_redis_url(url)
        # A request beyond max_connections waits for a free connection within its budget;
        # redis-py's default pool fails it at once instead, so a Redis that stalls for a
        # moment under many concurrent requests would turn the surplus into 503s.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # The library default retries timeouts too, with backoff: seconds of waiting on
            # a hung Redis. One immediate retry on a broken connection replaces a stale
            # pooled one after a Redis restart (the /events script is safe to retry).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            # RESP2: redis-py 8 opens each connection with HELLO 3, a command Redis 5 lacks,
            # which failed every call there (docs/serving.md says Redis 5 or newer).
            protocol=2,
            decode_responses=True,
            # Bytes a foreign writer stored that are not UTF-8 decode to U+FFFD and so count
            # as unknown ids, instead of failing the request. Outgoing strings are always
            # valid UTF-8 (the schemas refuse lone surrogates), so encoding is unaffected.
            encoding_errors="replace",
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._append_script = self._client.register_script(_APPEND_SCRIPT)

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.aclose()  # a pool given to the client is not the client's to close

    async def append(self, events: Sequence[Event]) -> None:
        """Append events to each user's capped list and to the stream, atomically (one Lua
        script): either the whole batch is written or nothing is.

        Nothing is written when a key has the wrong type (HistoryConflict), or when Redis does
        not answer within the timeout (RedisUnavailable): the script carries a deadline on
        Redis's own clock, set well before the client gives up, and refuses to write when it
        starts after it. When the reply is what is late, the request's token, set by the write,
        tells whether it ran. A reply lost to a broken connection is retried once, and the token
        makes that retry find the batch written rather than write it twice; only when the retry
        fails too, or Redis does not answer the token's lookup, is the outcome unknown, and the
        503 says so (docs/serving.md).
        """
        if not events:
            return
        # A dict keeps first-seen order: each user's list is KEYS[slot], listed once, and its
        # timestamps KEYS[slot + 1].
        user_of = {history_key(event.user_id): event.user_id for event in events}
        slot = {key: 3 + 2 * i for i, key in enumerate(user_of)}  # Lua is 1-based; see above
        token = f"{_TOKEN_PREFIX}{secrets.token_hex(16)}"
        args: list[str | int] = [
            0,  # the deadline, set once Redis's clock is known
            math.ceil(self.timeout_s * 2000) + 1000,  # the token outlives the request's budget
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
        start = time.monotonic()
        sent = False  # whether the script may have reached Redis
        try:
            async with asyncio.timeout(self.timeout_s):
                seconds, micros = await self._client.time()
                # The script must start within half of what is left of the budget, so a script
                # that did run leaves the other half for its own run time and its reply.
                left_us = (self.timeout_s - (time.monotonic() - start)) * 1e6
                args[0] = seconds * 1_000_000 + micros + max(int(left_us / 2), 0)
                sent = True
                keys = [EVENTS_STREAM, token]
                for key, user_id in user_of.items():
                    keys += [key, history_times_key(user_id)]
                WRITE_IN_FLIGHT.set(True)  # stays set if this task is cancelled (see above)
                wrong = await self._append_script(keys=keys, args=args)
                WRITE_IN_FLIGHT.set(False)
        except (RedisError, OSError) as exc:  # asyncio's TimeoutError is an OSError
            written: bool | None = False  # whether the batch was written; None: unknown
            if sent and isinstance(exc, TimeoutError | RedisTimeoutError):
                # The script may have run in time with its reply still on the way (a slow
                # network, a Redis that holds replies for an fsync): its token says. Our budget
                # is past the script's deadline on Redis's clock, so one that has not run yet
                # will not write.
                written = await self._token_set(token)  # WRITE_IN_FLIGHT is still set
                if written:
                    WRITE_IN_FLIGHT.set(False)
                    log.info("a late reply: the events were stored (token found)")
                    return
            elif sent and isinstance(exc, ResponseError | BusyLoadingError):
                # Refused (ACL, read-only replica, a Redis still loading its dataset), or stopped
                # at its first write: see above. (redis-py makes LOADING a ConnectionError.)
                pass
            elif sent:  # the connection broke after the script was sent (and on the retry)
                written = None
            WRITE_IN_FLIGHT.set(False)  # settled: the 503 says what happened
            outcome = "nothing was stored" if written is False else UNKNOWN_OUTCOME
            raise self._unavailable("store events", exc, outcome) from None
        if wrong == "expired":
            raise self._unavailable(
                "store events", TimeoutError("Redis ran the write too late"), "nothing was stored"
            )
        if wrong is not None and wrong != "done":
            key, found = wrong
            if key == EVENTS_STREAM:
                what, wanted = "the events stream", "stream"
            elif key in user_of:
                what, wanted = f"the history of user {user_of[key]!r}", "list"
            else:
                user = key.removeprefix(HISTORY_TIMES_PREFIX)
                what, wanted = f"the history timestamps of user {user!r}", "list"
            raise self._conflict(
                f"cannot store events: Redis key {key!r} ({what}) holds a {found}, not a "
                f"{wanted}; nothing was stored. Fix or delete that key, then send the events again"
            )

    async def histories(self, user_ids: Sequence[str], limit: int) -> list[list[str]]:
        """The last `limit` items of each user's history, oldest first ([] for unknown users).

        Raises HistoryConflict when a user's key holds something other than a list.
        """
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self._client.pipeline(transaction=False) as pipe,
            ):
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
        # An id longer than any a request may carry was written by someone else (POST /events
        # refuses it), is answered as unknown like any id the catalogue lacks, and is cut so
        # that a few huge ones cannot swell the response's unknown_ids to megabytes.
        return [
            [item if len(item) <= MAX_ID_LENGTH else item[:MAX_ID_LENGTH] + "…" for item in items]
            for items in replies
        ]

    async def ping(self) -> str | None:
        """None when Redis answers, else why not (with any password in the URL hidden)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.ping()
        except (RedisError, OSError) as exc:
            return self._reason(exc)
        return None

    def scrub(self, text: str) -> str:
        """`text` with the URL's password hidden (error messages may quote it)."""
        return scrub_secrets(text, self.url)

    def _conflict(self, message: str) -> HistoryConflict:
        # Someone else's data in our key space needs an operator, not just the client, to see it.
        log.warning("redis key conflict: %s", message)
        return HistoryConflict(message)

    async def _token_set(self, token: str) -> bool | None:
        """Whether an /events write's token is set (its batch was written); None if Redis does
        not say within the timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self._client.exists(token))
        except (RedisError, OSError):
            return None

    def _reason(self, exc: BaseException) -> str:
        """Why Redis failed, fit to print (asyncio's TimeoutError has no message of its own)."""
        detail = str(exc) or f"no reply within {self.timeout_s:g} s (REMI_REDIS_TIMEOUT_S)"
        return self.scrub(f"{type(exc).__name__}: {detail}")

    def _unavailable(
        self, action: str, exc: BaseException, outcome: str | None = None
    ) -> RedisUnavailable:
        reason = self._reason(exc)
        log.warning("redis unavailable (%s): %s", action, reason)
        message = f"cannot {action}: Redis at {redact_url(self.url)} is unavailable ({reason})"
        return RedisUnavailable(f"{message}; {outcome}" if outcome else message)
