"""Loading and preprocessing interaction logs."""

import gzip
import random
import re

import numpy as np
import pandas as pd
import pytest

from training.data import (
    DataConfig,
    DataError,
    SequenceDataset,
    build_dataset,
    load_dataset,
    official_split,
    read_interactions,
    synthetic_interactions,
)


def frame(rows):
    return pd.DataFrame(rows, columns=["user", "item", "time"])


def test_k_core_drops_rare_items_then_short_users():
    pairs = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3), ("b", 4), ("c", 1),
             ("c", 2)]  # fmt: skip
    rows = [(u, f"i{j}", t) for t, (u, j) in enumerate(pairs)]
    # min_count 2: item i4 (1 interaction) goes; every user keeps at least 2 interactions.
    ds = build_dataset(frame(rows), "t", min_count=2)
    assert sorted(i for i in ds.item_ids if i) == ["i1", "i2", "i3"]
    assert sorted(ds.user_ids) == ["a", "b", "c"]
    assert sorted(len(s) for s in ds.sequences) == [2, 3, 3]
    # min_count 3: only i1, i2 survive, leaving every user with 2 < 3 interactions.
    with pytest.raises(DataError, match="nothing left"):
        build_dataset(frame(rows), "t", min_count=3)


def test_filter_is_one_pass_like_the_official_scripts():
    rows = [(f"u{k}", f"y{j}", 10 * k + j) for k in range(6) for j in range(4)]
    rows += [(f"u{k}", "x", 100 + k) for k in (0, 1, 2, 3, 6)]
    ds = build_dataset(frame(rows), "t", min_count=5)
    # x had 5 interactions; dropping the short users u4, u5, u6 leaves it 4, yet it stays.
    assert sorted(ds.user_ids) == ["u0", "u1", "u2", "u3"]
    assert "x" in ds.item_ids


def test_sequences_are_time_ordered_and_ids_round_trip(tmp_path):
    rows = [("u", f"i{k}", 10 - k) for k in range(6)] * 1
    rows += [("v", f"i{k}", k) for k in range(6)]
    ds = build_dataset(frame(rows), "t", min_count=2)
    by_user = dict(zip(ds.user_ids, ds.sequences, strict=True))
    assert [ds.item_ids[r] for r in by_user["u"]] == [f"i{k}" for k in reversed(range(6))]
    assert [ds.item_ids[r] for r in by_user["v"]] == [f"i{k}" for k in range(6)]
    assert ds.item_ids[0] is None and min(min(s) for s in ds.sequences) == 1
    ds.save(tmp_path)
    loaded = SequenceDataset.load(tmp_path)
    assert loaded.item_ids == ds.item_ids and loaded.user_ids == ds.user_ids
    assert all(np.array_equal(a, b) for a, b in zip(loaded.sequences, ds.sequences, strict=True))
    assert loaded.fingerprint == ds.fingerprint
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(loaded, split), getattr(ds, split))


def test_split_is_the_official_rule_on_a_hand_example():
    users = [f"user{k}" for k in range(10)]  # order of first appearance
    reference = list(users)
    random.seed(1230)
    random.shuffle(reference)
    train, valid, test = official_split(10, 1230)
    assert [users[i] for i in train] == reference[:8]
    assert [users[i] for i in valid] == reference[8:9]
    assert [users[i] for i in test] == reference[9:]


@pytest.mark.parametrize("n", [7, 10, 101])
def test_split_sizes_are_8_1_1_and_disjoint(n):
    train, valid, test = official_split(n, 3)
    assert (len(train), len(valid), len(test)) == (int(n * 0.8), int(n * 0.9) - int(n * 0.8),
                                                   n - int(n * 0.9))  # fmt: skip
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(n))


def official_preprocessing(rows, min_count, seed=1230):
    """The official script's user handling, step by step: a dict of users in raw order."""
    users, item_count = {}, {}
    for user, item, _ in rows:
        users.setdefault(user, []).append(item)
        item_count[item] = item_count.get(item, 0) + 1
    kept = [u for u, items in users.items()
            if sum(item_count[i] >= min_count for i in items) >= min_count]  # fmt: skip
    rng = random.Random(seed)
    rng.shuffle(kept)
    n = len(kept)
    return kept[: int(n * 0.8)], kept[int(n * 0.8) : int(n * 0.9)], kept[int(n * 0.9) :]


def test_split_matches_the_official_script_on_an_interleaved_log():
    # Every third user's first interaction is with an item that the filter drops, so ordering
    # users by their first *kept* interaction would move them and change the split.
    rows, t = [], 0
    for step in range(6):
        for u in range(30):
            item = f"rare{u}" if step == 0 and u % 3 == 0 else f"i{(u + step) % 8}"
            if step > 0 or u % 3 == 0:
                rows.append((f"u{u:02d}", item, t))
                t += 1
    ds = build_dataset(frame(rows), "t", min_count=5)
    train, valid, test = official_preprocessing(rows, min_count=5)
    users = np.asarray(ds.user_ids)
    ours = [list(users[ds.train]), list(users[ds.valid]), list(users[ds.test])]
    assert ours == [train, valid, test]
    by_first_kept = list(pd.unique(frame(rows).query("not item.str.startswith('rare')")["user"]))
    assert by_first_kept != ds.user_ids  # the example does tell the two orders apart


def test_users_follow_first_appearance_order():
    rows = [("late", f"i{k}", 100 + k) for k in range(5)] + [
        ("early", f"i{k}", k) for k in range(5)
    ]
    ds = build_dataset(frame(rows), "t", min_count=1)
    assert ds.user_ids == ["late", "early"]  # file order, not time order


def test_readers_agree_across_formats(tmp_path):
    rows = [(f"u{u}", f"item{(u + k) % 7}", 1000 + 10 * k) for u in range(6) for k in range(6)]
    df = pd.DataFrame(rows, columns=["uid", "iid", "ts"])
    df.to_csv(tmp_path / "log.csv", index=False)
    df.to_parquet(tmp_path / "log.parquet")
    with gzip.open(tmp_path / "log.inter.gz", "wt") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u, i, t in rows:
            f.write(f"{u}\t{i}\t5\t{t}\n")
    with open(tmp_path / "log.txt", "w") as f:
        for u in range(6):
            f.write(f"u{u} " + " ".join(f"item{(u + k) % 7}" for k in range(6)) + "\n")
    cols = {"user_col": "uid", "item_col": "iid", "time_col": "ts"}
    datasets = [
        load_dataset(DataConfig(source=str(tmp_path / "log.csv"), **cols)),
        load_dataset(DataConfig(source=str(tmp_path / "log.parquet"), **cols)),
        load_dataset(DataConfig(source=str(tmp_path / "log.inter.gz"))),
        load_dataset(DataConfig(source=str(tmp_path / "log.txt"))),
    ]
    assert len({d.fingerprint for d in datasets}) == 1
    assert datasets[0].name == "log"


def test_clear_errors_name_the_file_and_problem(tmp_path):
    missing = tmp_path / "log.csv"
    pd.DataFrame({"user_id": ["a"], "item": ["x"], "timestamp": [1]}).to_csv(missing, index=False)
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*missing column.*item_id"):
        load_dataset(DataConfig(source=str(missing)))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv.*empty"):
        load_dataset(DataConfig(source=str(empty)))
    small = tmp_path / "small.txt"
    small.write_text("u1 a b c\nu2 a b\n")
    with pytest.raises(DataError, match="small.txt.*nothing left.*fewer than 5"):
        load_dataset(DataConfig(source=str(small)))
    with pytest.raises(DataError, match="nope.csv.*not found"):
        load_dataset(DataConfig(source=str(tmp_path / "nope.csv")))
    odd = tmp_path / "log.xyz"
    odd.write_text("x")
    with pytest.raises(DataError, match="--format"):
        load_dataset(DataConfig(source=str(odd)))
    bad_time = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": ["a"], "item_id": ["x"], "timestamp": ["soon"]}).to_csv(
        bad_time, index=False
    )
    with pytest.raises(DataError, match="timestamp"):
        load_dataset(DataConfig(source=str(bad_time)))
    # Infinite timestamps sorted after (or before) every event; dates mixed with numbers were
    # a pandas traceback ("1002" is the year 1002, out of its range).
    for name, times in (("inf", ["5", "inf", "-inf", "1e400"]), ("mixed", ["2024-01-01", "1002"])):
        path = tmp_path / f"{name}.csv"
        pd.DataFrame({"user_id": "a", "item_id": "x", "timestamp": times}).to_csv(path, index=False)
        with pytest.raises(DataError, match=f"{name}.csv: column 'timestamp' holds unparseable"):
            load_dataset(DataConfig(source=str(path)))
    # The same in a .inter file (read without that check) sorted after every streamed event.
    inter = tmp_path / "inf.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\na\tx\t5\na\ty\tinf\n")
    with pytest.raises(DataError, match="1 interaction.s. have a missing, non-numeric or infin"):
        load_dataset(DataConfig(source=str(inter)))
    # A field more than the header (a trailing comma; an extra value, which made pandas read
    # the items as users and the timestamps as items, silently).
    for extra in ("", "1"):
        shifted = tmp_path / f"shifted{extra}.csv"
        rows = "".join(f"u{u},i{i},{10 * u + i},{extra}\n" for u in range(9) for i in range(6))
        shifted.write_text("user_id,item_id,timestamp\n" + rows)
        with pytest.raises(DataError, match="shifted.*more fields than the header"):
            load_dataset(DataConfig(source=str(shifted), min_count=1))


def test_blank_ids_are_refused_when_read_not_at_export(tmp_path):
    rows = [(f"u{u}", f"i{(u + k) % 4}", 1000 + k) for u in range(8) for k in range(6)]
    rows[9] = ("u1", "", 1003)  # data row 10
    csv = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"log.csv: 1 interaction\(s\) have an empty item id "):
        load_dataset(DataConfig(source=str(csv), min_count=1))
    # A parquet null was read as the item "None".
    nulls = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype(object)
    nulls.loc[[3, 20], "user_id"] = None
    parquet = tmp_path / "log.parquet"
    nulls.to_parquet(parquet)
    with pytest.raises(DataError, match=r"2 interaction\(s\) have an empty user id .*data row 4"):
        load_dataset(DataConfig(source=str(parquet), min_count=1))


def test_a_user_on_several_lines_of_a_sequence_file_reads_in_file_order(tmp_path):
    seq = tmp_path / "log.txt"
    seq.write_text("u1 a b c d e\nu2 a b c d e\nu1 f g h i j\n")
    data = load_dataset(DataConfig(source=str(seq), min_count=1))
    read = {data.user_ids[u]: [data.item_ids[r] for r in s] for u, s in enumerate(data.sequences)}
    assert read == {"u1": list("abcdefghij"), "u2": list("abcde")}


def test_synthetic_data_is_seeded_readable_and_multi_interest():
    a, b = synthetic_interactions(50, seed=3), synthetic_interactions(50, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(synthetic_interactions(50, seed=4))
    assert a["item"].str.fullmatch(r"[a-z]+-\d{4}").all()
    categories = a.assign(cat=a["item"].str.split("-").str[0]).groupby("user")["cat"].nunique()
    assert (categories >= 2).mean() > 0.9


def test_dates_become_unix_seconds_like_streamed_events(tmp_path):
    dates = pd.to_datetime(["2026-01-01 00:00:00", "2026-01-01 00:00:10"])
    df = pd.DataFrame({"user_id": ["a", "a"], "item_id": ["x", "y"], "timestamp": dates})
    df.to_parquet(tmp_path / "log.parquet")
    df.assign(timestamp=dates.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(tmp_path / "log.csv")
    for name in ("log.parquet", "log.csv"):
        frame = read_interactions(DataConfig(source=str(tmp_path / name)))
        assert frame["time"].tolist() == [1767225600.0, 1767225610.0]
