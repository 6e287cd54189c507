"""The nightly job's event log (training/nightly/event_log.py): files that survive crashes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import REPO
from training.cli import app
from training.data import DataError
from training.nightly.event_log import (
    advance_position,
    collect,
    events_frame,
    load_events,
    next_id,
    save_events,
)
from training.nightly.job import _redis_client


def entries(first: int, last: int) -> list[tuple[str, dict[str, str]]]:
    return [
        (
            f"{ms}-0",
            {"user_id": f"u{ms % 3}", "item_id": f"i{ms}", "timestamp": str(1_700_000_000 + ms)},
        )
        for ms in range(first, last + 1)
    ]


def test_a_range_read_again_after_a_crash_replaces_the_shorter_file(tmp_path: Path) -> None:
    # A run saved ids 100..104, then died before advancing the position; more events arrived,
    # and the next run read 100..109 again. Only the longer file must stay.
    first, _ = events_frame(entries(100, 104))
    save_events(tmp_path, first)
    again, _ = events_frame(entries(100, 109))
    kept = save_events(tmp_path, again)
    files = sorted((tmp_path / "events").glob("events-*.csv"))
    assert files == [kept] and kept.name == "events-100-0--109-0.csv"
    events, dropped = load_events(tmp_path)
    assert len(events) == 10 and dropped == 0
    # A later, disjoint range is kept beside it.
    later, _ = events_frame(entries(110, 111))
    save_events(tmp_path, later)
    assert len(list((tmp_path / "events").glob("events-*.csv"))) == 2


def test_an_entry_that_is_not_utf8_is_skipped_not_fatal(redis_server, tmp_path: Path) -> None:
    # Another writer's bytes stopped every nightly run at the read ('utf-8' codec can't
    # decode), the position never moving: the entry must count as malformed instead.
    import redis

    raw = redis.Redis.from_url(redis_server.url)  # stores bytes as given
    raw.xadd("remi:events", {"user_id": "u1", "item_id": "i1", "timestamp": "1700000000"})
    raw.xadd("remi:events", {b"user_id": b"\xff\xfebad", b"item_id": b"i2", b"timestamp": b"1"})
    raw.xadd("remi:events", {"user_id": "u2", "item_id": b"\xc3", "timestamp": "1700000001"})
    raw.close()
    batch = collect(_redis_client(redis_server.url), "remi:events", "remi:pos", tmp_path)
    assert batch.read == 3 and batch.malformed == 2
    assert batch.accumulated["item"].tolist() == ["i1"]


def test_events_trimmed_before_a_run_read_them_are_counted(redis_server, tmp_path: Path) -> None:
    # A stream capped on the API side (REMI_STREAM_MAXLEN) drops events no run has read: the
    # job must say how many, not train on the rest as if nothing happened.
    client = _redis_client(redis_server.url)
    client.delete("remi:events", "remi:pos", "remi:pos:entries-added")

    def add(count: int, maxlen: int | None = None) -> None:
        for i in range(count):
            event = {"user_id": f"u{i % 3}", "item_id": f"i{i}", "timestamp": 1_700_000_000 + i}
            client.xadd("remi:events", event, maxlen=maxlen, approximate=False)

    def night() -> tuple[int, int | None]:
        batch = collect(client, "remi:events", "remi:pos", tmp_path)
        if batch.has_new:
            advance_position(client, "remi:events", "remi:pos", batch, tmp_path)
        return batch.read, batch.lost

    add(20, maxlen=5)  # 15 gone before the first run
    assert night() == (5, 15)
    add(10)
    assert night() == (10, 0)  # our own trim of what was read is no loss
    add(10)
    client.xtrim("remi:events", maxlen=3, approximate=False)
    assert night() == (3, 7)
    assert night() == (0, 0)
    # A position saved without the count (an older version's) cannot tell.
    client.delete("remi:pos:entries-added")
    add(4)
    assert night() == (4, None)
    assert night() == (0, 0)  # ... and the next run can again
    # The stream deleted and made again: its count restarts below the saved one.
    client.delete("remi:events")
    add(2)
    assert night() == (2, None)
    # A run that saved 10 entries and died before committing; 7 of them trimmed since. The
    # next run reads the 3 left and 2 new ones: the 7 are in the saved file, not lost.
    add(10)
    collect(client, "remi:events", "remi:pos", tmp_path)  # no advance_position: it died
    client.xtrim("remi:events", maxlen=3, approximate=False)
    add(2)
    assert night() == (5, 0)
    # Trimmed to nothing: the stream's last entry is gone, but not its last id. The loss is
    # counted once, and the position moves past it.
    add(6)
    client.xtrim("remi:events", maxlen=0, approximate=False)
    assert night() == (0, 6)
    add(1)
    assert night() == (1, 0)
    # ... and what a run that died had saved is no loss either, when all of it is trimmed.
    add(8)
    collect(client, "remi:events", "remi:pos", tmp_path)
    client.xtrim("remi:events", maxlen=0, approximate=False)
    assert night() == (0, 0)


def test_a_redis_that_lost_the_position_is_said_so(redis_server, tmp_path: Path) -> None:
    import redis

    # Redis restarted without persistence: the position and its count are gone, the stream is
    # new. Counted from 0-0, the events saved by earlier nights looked read from this stream,
    # and 6 trimmed events were reported as 3: a confident wrong number. Now: not known, and
    # the position this state directory committed is named.
    client = _redis_client(redis_server.url)
    client.delete("remi:events", "remi:pos", "remi:pos:entries-added")
    for i in range(3):
        client.xadd("remi:events", {"user_id": "u", "item_id": f"i{i}", "timestamp": 1_700_000_000})
    batch = collect(client, "remi:events", "remi:pos", tmp_path)
    assert (batch.read, batch.lost, batch.redis_behind) == (3, 0, None)
    advance_position(client, "remi:events", "remi:pos", batch, tmp_path)
    client.delete("remi:events", "remi:pos", "remi:pos:entries-added")  # the data loss
    for i in range(10):
        event = {"user_id": "v", "item_id": f"j{i}", "timestamp": 1_700_000_100}
        client.xadd("remi:events", event, maxlen=4, approximate=False)
    after = collect(client, "remi:events", "remi:pos", tmp_path)
    assert (after.read, after.lost, after.redis_behind) == (4, None, batch.stream_end)
    assert after.report()["redis_behind"] == batch.stream_end
    advance_position(client, "remi:events", "remi:pos", after, tmp_path)
    client.xadd("remi:events", {"user_id": "v", "item_id": "k", "timestamp": 1_700_000_200})
    again = collect(client, "remi:events", "remi:pos", tmp_path)  # in step again
    assert (again.read, again.lost, again.redis_behind) == (1, 0, None)
    advance_position(client, "remi:events", "remi:pos", again, tmp_path)
    # Redis back from an older snapshot: the position and its count survive, older. An event
    # sent between the snapshot and the restore is gone, and that count never saw it.
    raw = redis.Redis.from_url(redis_server.url)
    client.xadd("remi:events", {"user_id": "v", "item_id": "l", "timestamp": 1_700_000_300})
    keys = ("remi:events", "remi:pos", "remi:pos:entries-added")
    snapshot = {key: raw.dump(key) for key in keys}  # "l" in it, not yet read
    night = collect(client, "remi:events", "remi:pos", tmp_path)
    advance_position(client, "remi:events", "remi:pos", night, tmp_path)
    client.xadd("remi:events", {"user_id": "v", "item_id": "m", "timestamp": 1_700_000_400})
    for key, dumped in snapshot.items():
        raw.restore(key, 0, dumped, replace=True)
    client.xadd("remi:events", {"user_id": "v", "item_id": "n", "timestamp": 1_700_000_500})
    restored = collect(client, "remi:events", "remi:pos", tmp_path)
    assert (restored.lost, restored.redis_behind) == (None, night.stream_end)  # "m": untold
    raw.close()


def test_stream_ids_past_int64_are_read_and_ordered(tmp_path: Path) -> None:
    # Each part of a stream id is an unsigned 64-bit integer; ids past 2**63 made an
    # OverflowError in every later run (the file was already saved).
    top = 2**64 - 1
    ids = [f"{2**63}-0", "5-0", f"{2**63}-{top}"]
    frame, _ = events_frame(
        [
            (i, {"user_id": "u", "item_id": f"i{n}", "timestamp": "1700000000"})
            for n, i in enumerate(ids)
        ]
    )
    save_events(tmp_path, frame)
    events, _ = load_events(tmp_path)
    assert events["stream_id"].tolist() == ["5-0", f"{2**63}-0", f"{2**63}-{top}"]
    assert next_id(f"{2**63}-{top}") == f"{2**63 + 1}-0"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("events-105-0--106-0.csv", '"stream_id","user","item","time"\n"105-0","u2","i1'),
        ("events-105-0--106-0.csv", '"stream_id","user","item","time"\n"105-0","u2",'),
        ("events-105-0--106-0.csv", "\x00\x01 not a csv at all"),
        ("events-105-0--106-0.csv", '"stream_id","user"\n"105-0","u2"\n'),
        ("events-backup.csv", '"stream_id","user","item","time"\n"105-0","u2","i1",5\n'),
    ],
)
def test_a_damaged_events_file_is_named_in_a_clear_error(tmp_path: Path, name, content) -> None:
    good, _ = events_frame(entries(100, 104))
    save_events(tmp_path, good)
    (tmp_path / "events" / name).write_text(content)
    with pytest.raises(DataError, match=re.escape(name)) as caught:
        load_events(tmp_path)
    assert "move it out of" in str(caught.value)


def test_the_cli_reports_a_damaged_events_file_without_a_traceback(redis_server, tmp_path) -> None:
    state = tmp_path / "state"
    (state / "events").mkdir(parents=True)
    (state / "events" / "events-1-0--2-0.csv").write_text('"stream_id","user"\n"1-0",')
    result = CliRunner().invoke(
        app,
        ["nightly", "--config", str(REPO / "configs" / "nightly-test.yaml"),
         "--bundle-root", str(tmp_path / "b"), "--state-dir", str(state),
         "--redis-url", redis_server.url],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "events-1-0--2-0.csv" in result.output and "Traceback" not in result.output
    # The failed run's report is printed as every run's is, not only written to its file.
    printed = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    [written] = (state / "reports").glob("*.json")
    assert printed == json.loads(written.read_text())
    assert printed["status"] == "failed" and "DataError" in printed["error"]


def test_the_nightly_client_reads_a_redis_without_hello(redis_without_hello) -> None:
    # redis-py 8 opens connections with HELLO 3, which Redis 5 lacks: every night failed there.
    client = _redis_client(redis_without_hello.url)
    client.xadd("remi:events", {"user_id": "u", "item_id": "i", "timestamp": "1"})
    assert client.xlen("remi:events") == 1
