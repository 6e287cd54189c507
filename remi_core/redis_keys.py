"""Redis keys, fields and URL checks shared by the service (writer) and the nightly job."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

EVENTS_STREAM = "remi:events"
"""Stream of raw interactions; entry fields are user_id, item_id, timestamp (all strings)."""

HISTORY_PREFIX = "remi:history:"
"""Per-user capped list of item ids, oldest first: HISTORY_PREFIX + user_id."""


HISTORY_TIMES_PREFIX = "remi:history-times:"
"""Per-user list of the timestamps of HISTORY_PREFIX + user_id's entries, index by index: the
service keeps the history in timestamp order with it."""


def history_key(user_id: str) -> str:
    return f"{HISTORY_PREFIX}{user_id}"


def history_times_key(user_id: str) -> str:
    return f"{HISTORY_TIMES_PREFIX}{user_id}"


# Event timestamps: unix seconds from 2000-01-01T00:00:00Z to before the end of tomorrow (UTC).
# POST /events refuses others; the nightly job skips others that another writer stored.
EARLIEST_TIMESTAMP = 946_684_800
DAY_S = 86_400


def latest_timestamp(now: float | None = None) -> int:
    """The first timestamp refused as too far ahead: midnight (UTC) after tomorrow. Whole days,
    so the bound moves once a day and the OpenAPI schema can state it exactly."""
    now = time.time() if now is None else now
    return (int(now) // DAY_S + 2) * DAY_S


def redis_url_problem(url: str, pool_class: Any = None) -> str | None:
    """Why redis-py would take a Redis URL and then fail or silently misread it, or None (other
    schemes and URLs it cannot parse at all are left to redis-py's own errors).

    - A database part that is no whole number (a typo like /O for /0) is read as database 0,
      and a negative one is passed on for Redis to refuse at every command.
    - A query option the connection does not take (`?ssl=true` on redis://, a misspelt
      `?sockettimeout=1`) is a TypeError at the first connection, not at start-up.
    `pool_class`: the connection pool the caller will open the URL with (its options differ:
    redis.asyncio's BlockingConnectionPool takes `timeout`, only the sync one OCSP checks);
    default redis.ConnectionPool, as `redis.Redis.from_url`.
    """
    import redis

    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return None
    databases = parse_qs(parts.query).get("db", [])
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix:// URL needs the socket's path (unix:///run/redis.sock)"
    else:
        databases.append(unquote(parts.path).replace("/", ""))  # as redis-py reads it
    for database in databases:
        try:
            number = int(database) if database.strip() else 0
        except ValueError:
            number = -1
        if number < 0:
            return f"the database must be a whole number >= 0, not {database!r}"
    try:
        (pool_class or redis.ConnectionPool).from_url(url).make_connection()  # no connecting
    except TypeError as exc:
        option = re.search(r"keyword argument '([^']*)'", str(exc))
        name = repr(option[1]) if option else "an option"
        return f"{name} is not an option of a {parts.scheme}:// connection"
    return None
