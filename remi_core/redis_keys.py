"""Redis keys and fields shared by the service (writer) and the nightly job (reader)."""

from __future__ import annotations

import time

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
