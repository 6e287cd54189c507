"""Redis keys and fields shared by the service (writer) and the nightly job (reader)."""

from __future__ import annotations

EVENTS_STREAM = "remi:events"
"""Stream of raw interactions; entry fields are user_id, item_id, timestamp (all strings)."""

HISTORY_PREFIX = "remi:history:"
"""Per-user capped list of item ids, oldest first: HISTORY_PREFIX + user_id."""


def history_key(user_id: str) -> str:
    return f"{HISTORY_PREFIX}{user_id}"
