"""The nightly job's event log (training/nightly/event_log.py): files that survive crashes."""

from __future__ import annotations

from pathlib import Path

from training.nightly.event_log import events_frame, load_events, save_events


def entries(first: int, last: int) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"{ms}-0", {"user_id": f"u{ms % 3}", "item_id": f"i{ms}", "timestamp": str(ms)})
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
