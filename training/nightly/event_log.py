"""The event log: the service's Redis stream, read once, kept as CSV files in the state directory.

Steps 2 and 8 of the job (see job.py): `collect` reads the entries after the saved position up to
the stream's end *now* and appends them to state_dir/events/ before anything else happens;
`advance_position` moves the saved position to that end, last of all, and trims the consumed
entries from the stream. Every later night reads all saved files again (`load_events`), so the
accumulated events keep counting whether or not a night's model is published; a damaged file
stops the job with a DataError naming it (exit 2), never silently.

Events removed from the stream before any run read them (a `REMI_STREAM_MAXLEN` cap on the API,
an operator's XTRIM or XDEL) are counted, not silently missed: Redis counts every entry ever
added to a stream (`entries-added`), and the position is saved with that count as of its read,
so tonight's count less the saved one is what arrived since, of which `read` reached this run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from redis.exceptions import ResponseError

from remi_core.atomic import atomic_file
from remi_core.redis_keys import EARLIEST_TIMESTAMP, latest_timestamp
from training.data import DataError

EVENT_COLUMNS = ("stream_id", "user", "item", "time")


@dataclass(frozen=True)
class EventBatch:
    """What step 2 read: tonight's new entries, and every accumulated event."""

    position_before: str  # the saved position: the last stream id consumed by an earlier run
    stream_end: str | None  # the stream's last id when this run started (None: empty stream)
    read: int  # entries read after position_before, up to stream_end
    malformed: int  # of those, entries without a usable user, item or timestamp
    saved_to: Path | None  # the file they were saved to (None: nothing new)
    accumulated: pd.DataFrame  # all saved events, deduplicated, oldest first
    duplicates_dropped: int
    # Entries added after position_before, up to stream_end, that were gone before this run
    # read them (None: not known, e.g. the position was saved by a version without the count).
    lost: int | None = None
    entries_added: int | None = None  # Redis's count of entries ever added, as of stream_end
    # The position this state directory last committed, when Redis's is behind it: Redis lost
    # data since (a restart without persistence, an older snapshot, a lagging replica).
    redis_behind: str | None = None

    def report(self) -> dict[str, Any]:
        return {
            "position_before": self.position_before,
            "stream_end": self.stream_end,
            "read": self.read,
            "malformed": self.malformed,
            "saved_to": str(self.saved_to) if self.saved_to else None,
            "accumulated": len(self.accumulated),
            "duplicates_dropped": self.duplicates_dropped,
            "lost_before_read": self.lost,
            "redis_behind": self.redis_behind,
        }

    @property
    def has_new(self) -> bool:
        """Whether the stream reached past the saved position (so step 8 advances it)."""
        return self.stream_end is not None and parse_id(self.stream_end) > parse_id(
            self.position_before
        )


def parse_id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


# Both parts of a stream id are unsigned 64-bit integers.
_ID_PART_MAX = 2**64 - 1


def next_id(stream_id: str) -> str:
    """The smallest id after stream_id (an exclusive XRANGE start that works on any Redis)."""
    ms, seq = parse_id(stream_id)
    return f"{ms + 1}-0" if seq == _ID_PART_MAX else f"{ms}-{seq + 1}"


def added_key(position_key: str) -> str:
    """Where the stream's entries-added count is saved beside the position."""
    return f"{position_key}:entries-added"


def committed_path(state_dir: Path) -> Path:
    """Where step 8 notes the position it committed to Redis, to tell when Redis lost it."""
    return Path(state_dir) / "events" / "committed.json"


def _committed(state_dir: Path) -> str | None:
    try:
        return str(json.loads(committed_path(state_dir).read_text())["position"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: not known
        return None


def collect(client: Any, stream_key: str, position_key: str, state_dir: Path) -> EventBatch:
    """Step 2: read (saved position, stream end] and save it to the event log."""
    position = client.get(position_key) or "0-0"
    committed = _committed(state_dir)
    behind = committed if committed and parse_id(committed) > parse_id(position) else None
    end, added = stream_end(client, stream_key)
    entries = []
    if end is not None and parse_id(end) > parse_id(position):
        entries = list(read_stream(client, stream_key, position, end))
    frame, malformed = events_frame(entries)
    saved = save_events(state_dir, frame)  # first of all: the stream may lose them any time
    # Entries a run that died before committing saved, and that left the stream since (a trim),
    # were read all the same: not lost.
    read_before = 0
    if end is not None:
        read_before = len(saved_ids(state_dir, position, end) - {sid for sid, _ in entries})
    saved_count = client.get(added_key(position_key))
    lost = lost_before_read(saved_count, position, added, len(entries) + read_before)
    if behind is not None:
        # Redis lost data since the last commit: its count restarted (a restart without
        # persistence), or went back to a snapshot's, which never counted what arrived between
        # the snapshot and the restore. What was lost cannot be told.
        lost = None
    events, duplicates = load_events(state_dir)
    return EventBatch(
        position, end, len(entries), malformed, saved, events, duplicates, lost, added, behind
    )


def stream_end(client: Any, stream_key: str) -> tuple[str | None, int | None]:
    """The id of the last entry ever added to the stream and how many entries were ever added
    up to it (one XINFO, so the two agree); (None, None) for a stream that does not exist or
    never had an entry. The last id ever added, not the last one still there: a stream trimmed
    empty since the last run still ends past its position, so the loss is counted once and the
    position (with its count) moves on."""
    try:
        info = client.xinfo_stream(stream_key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None, None
        raise
    last = info.get("last-generated-id")
    added = info.get("entries-added")  # Redis 7+; older servers do not count
    if not last or parse_id(last) == (0, 0):
        return None, None
    return last, (int(added) if added is not None else None)


def lost_before_read(saved: str | None, position: str, added: int | None, read: int) -> int | None:
    """Entries added after the saved position that this run did not read: gone before it did.

    `saved` is the entries-added count saved with the position (None before the first run
    that saved one: then only a run from the stream's start, position 0-0, can tell)."""
    if added is None:
        return None
    if saved is None and position != "0-0":
        return None
    before = int(saved) if saved is not None else 0
    lost = added - before - read
    # Negative: the stream was deleted and made again (its count restarted); not knowable.
    return lost if lost >= 0 else None


def advance_position(
    client: Any, stream_key: str, position_key: str, batch: EventBatch, state_dir: Path
) -> dict[str, Any]:
    """Step 8: save the stream end as the position (in Redis, then noted in state_dir), then
    trim the consumed (saved) entries."""
    assert batch.stream_end is not None and batch.has_new
    with client.pipeline(transaction=True) as pipe:  # the position and its count together
        pipe.set(position_key, batch.stream_end)
        if batch.entries_added is not None:
            pipe.set(added_key(position_key), batch.entries_added)
        else:
            pipe.delete(added_key(position_key))
        pipe.execute()
    committed_path(state_dir).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(committed_path(state_dir)) as tmp:
        tmp.write_text(json.dumps({"position": batch.stream_end}))
    # XTRIM MINID drops ids < minid: exactly the consumed (and saved) entries.
    trimmed = client.xtrim(stream_key, minid=next_id(batch.stream_end), approximate=False)
    return {"position_after": batch.stream_end, "trimmed": trimmed}


def read_stream(
    client: Any, key: str, after: str, end: str, page: int = 10_000
) -> Iterator[tuple[str, dict[str, str]]]:
    """Entries with after < id <= end, oldest first, in pages."""
    start = next_id(after)
    while True:
        batch = client.xrange(key, min=start, max=end, count=page)
        yield from batch
        if len(batch) < page:
            return
        start = next_id(batch[-1][0])


def events_frame(entries: list[tuple[str, dict[str, str]]]) -> tuple[pd.DataFrame, int]:
    """(stream_id, user, item, time) rows from stream entries, and how many were malformed."""
    rows, bad = [], 0
    latest = latest_timestamp()
    for stream_id, data in entries:
        try:
            user, item = str(data["user_id"]), str(data["item_id"])
            ts = float(data["timestamp"])
            # Bytes that are not UTF-8 arrive as lone surrogates (the client decodes with
            # "surrogateescape", `redis_client`): such an id is no id anyone sent.
            user.encode(), item.encode()
        except (KeyError, TypeError, ValueError):  # UnicodeEncodeError is a ValueError
            bad += 1
            continue
        if not user.strip() or not item.strip() or not EARLIEST_TIMESTAMP <= ts < latest:
            bad += 1  # out of POST /events' range too: milliseconds, garbage, infinities
            continue
        rows.append((stream_id, user, item, ts))
    return pd.DataFrame(rows, columns=list(EVENT_COLUMNS)), bad


def save_events(state_dir: Path, frame: pd.DataFrame) -> Path | None:
    """Write a batch of events as state_dir/events/events-<first id>--<last id>.csv, atomically.

    A range read again after a crash (the position did not move) starts where the saved file
    starts and may reach further: the new file is written first, then every file whose range it
    covers, and whose every event it holds, is deleted, so the log keeps each event once without
    ever holding it in no file. A file whose events the re-read range lacks stays: Redis lost
    them (restarted from an older snapshot, a failover to a lagging replica, an XDEL), and
    saved events are kept (`load_events` drops what two files both hold).
    """
    if frame.empty:
        return None
    directory = Path(state_dir) / "events"
    directory.mkdir(parents=True, exist_ok=True)
    first, last = frame["stream_id"].iloc[0], frame["stream_id"].iloc[-1]
    path = directory / f"events-{first}--{last}.csv"
    if path.exists():  # the same range read again: keep what only the saved file still holds
        try:
            old = _read_events_file(path)
        except DataError:  # damaged: tonight's read of its whole range replaces it, as before
            old = frame.iloc[:0]
        only_saved = old[~old["stream_id"].isin(frame["stream_id"])]
        if len(only_saved):
            frame = pd.concat([frame, only_saved], ignore_index=True)
            ids = frame["stream_id"].tolist()
            frame = frame.iloc[sorted(range(len(ids)), key=lambda r: parse_id(ids[r]))]
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False, columns=list(EVENT_COLUMNS), quoting=csv.QUOTE_NONNUMERIC)
    saved = set(frame["stream_id"])
    for old in event_files(state_dir):
        old_first, old_last = file_range(old)
        if old == path or not parse_id(first) <= old_first or not old_last <= parse_id(last):
            continue
        try:
            covered = set(_read_events_file(old)["stream_id"]) <= saved
        except DataError:
            continue  # not this function's to judge: load_events stops on it, naming it
        if covered:
            old.unlink(missing_ok=True)
    return path


def saved_ids(state_dir: Path, after: str, end: str) -> set[str]:
    """Stream ids in the saved files with after < id <= end."""
    low, high = parse_id(after), parse_id(end)
    ids: set[str] = set()
    for path in event_files(state_dir):
        first, last = file_range(path)
        if last <= low or first > high:
            continue
        ids.update(i for i in _read_events_file(path)["stream_id"] if low < parse_id(i) <= high)
    return ids


def event_files(state_dir: Path) -> list[Path]:
    return sorted((Path(state_dir) / "events").glob("events-*.csv"))


def file_range(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first id, last id) of an events file, from its name."""
    first, _, last = path.name.removeprefix("events-").removesuffix(".csv").partition("--")
    try:
        return parse_id(first), parse_id(last)
    except ValueError:
        raise _damaged(path, "its name is not events-<first id>--<last id>.csv") from None


def _damaged(path: Path, problem: str) -> DataError:
    return DataError(
        f"{path}: {problem}. The nightly job cannot read its saved events. They were already "
        f"consumed from the Redis stream: repair the file, or move it out of {path.parent} "
        "(its events are then left out of training)"
    )


def _read_events_file(path: Path) -> pd.DataFrame:
    """One saved file, checked: the columns, ids, users, items and finite timestamps."""
    file_range(path)
    try:
        frame = pd.read_csv(
            path, dtype={"stream_id": str, "user": str, "item": str}, keep_default_na=False
        )
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise _damaged(path, f"cannot parse it as CSV ({exc})") from None
    if list(frame.columns) != list(EVENT_COLUMNS):
        raise _damaged(path, f"its columns are {list(frame.columns)}, not {list(EVENT_COLUMNS)}")
    times = pd.to_numeric(frame["time"], errors="coerce")
    bad = (
        ~frame["stream_id"].str.fullmatch(r"\d+-\d+")
        | (frame["user"].str.strip() == "")
        | (frame["item"].str.strip() == "")
        | ~np.isfinite(times.to_numpy(dtype=float, na_value=np.nan))
    )
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # 1-based, after the header line
        raise _damaged(path, f"line {row} is incomplete or malformed (a truncated write?)")
    return frame.assign(time=times.astype(float))


def load_events(state_dir: Path) -> tuple[pd.DataFrame, int]:
    """All accumulated events, deduplicated; and how many duplicates were dropped.

    Dedupe by stream id (a range read twice after a crash), then by (user, item, time): the
    service delivers at least once, so a client retry can store the same event under two ids.
    """
    files = event_files(state_dir)
    if not files:
        return pd.DataFrame(columns=list(EVENT_COLUMNS)), 0
    frame = pd.concat([_read_events_file(f) for f in files], ignore_index=True)
    before = len(frame)
    frame = frame.drop_duplicates("stream_id").drop_duplicates(["user", "item", "time"])
    # uint64: each part of an id may reach 2**64 - 1, past int64.
    ms_seq = frame["stream_id"].str.split("-", expand=True).astype("uint64")
    frame = frame.iloc[np.lexsort((ms_seq[1], ms_seq[0]))].reset_index(drop=True)
    return frame, before - len(frame)
