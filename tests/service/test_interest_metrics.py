"""Interest signals in /metrics: routing concentration, items per interest slot, coverage."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from remi_core.bundle import load_bundle, write_bundle
from service.app import create_app
from service.settings import Settings
from service.signals import CoverageWindow
from tests.helpers import dead_redis_url, tiny_item_ids, write_tiny_bundle

ITEMS = [i for i in tiny_item_ids() if i is not None]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_coverage_window_counts_distinct_rows_and_rotates():
    clock = Clock()
    window = CoverageWindow(60, clock=clock)
    window.reset(11)  # rows 1..10 are items
    window.add(np.array([1, 2, 2, 3, 0]))  # padding row 0 is not an item
    window.add(np.array([3, 4]))
    assert window.current() == 4 and window.last() is None
    assert window.coverage() == pytest.approx(0.4)  # no window has ended: the current one
    clock.now += 61
    window.add(np.array([5]))
    assert window.last() == 4 and window.current() == 1
    assert window.coverage() == pytest.approx(0.4)
    clock.now += 60
    assert window.last() == 1 and window.current() == 0
    clock.now += 500  # a silent stretch: the last complete window saw nothing
    assert window.last() == 0
    window.add(np.array([99, -1]))  # rows outside the catalogue are ignored, never an error
    assert window.current() == 0
    window.reset(5)
    assert window.current() == 0 and window.last() is None


def collapsed_bundle(root: Path, merged: bool) -> Path:
    """A tiny ComiRec-SA whose routing is collapsed by construction: very sharp attention, so
    each interest is one history item (what training without RR gives); `merged`: the same
    attention for every interest, so all interests are also one and the same vector."""
    plain = load_bundle(write_tiny_bundle(root / "seed", seed=0))
    encoder = plain.encoder
    with torch.no_grad():
        weight = encoder.attn_out.weight  # (K, 4d): one row of attention logits per interest
        weight[:] = (weight[0:1] if merged else weight) * 300
    return write_bundle(root / "bundles", encoder=encoder, item_ids=plain.item_ids,
                        popularity=plain.popularity, metadata={})  # fmt: skip


def scrape(client: TestClient) -> dict[str, dict[tuple, float]]:
    """/metrics as {sample name: {labels as sorted tuples: value}}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def serve_traffic(root: Path) -> dict[str, dict[tuple, float]]:
    settings = Settings(bundle_root=root, redis_url=dead_redis_url(), reload_interval_s=0)
    rng = np.random.default_rng(0)
    with TestClient(create_app(settings)) as client:
        for _ in range(40):
            history = list(rng.choice(ITEMS, size=int(rng.integers(2, 12))))
            assert client.post("/recommend", json={"history": history, "n": 10}).status_code == 200
        batch = [{"history": [ITEMS[0]], "n": 10}, {"history": [], "n": 10}]  # no routing signal
        assert client.post("/recommend/batch", json={"requests": batch}).status_code == 200
        return scrape(client)


def slot_shares(metrics: dict) -> np.ndarray:
    slots = metrics["remi_items_by_interest_total"]
    counts = np.array([slots[(("interest", str(k)),)] for k in range(4)])
    return counts / counts.sum()


def test_signals_tell_a_healthy_model_from_collapsed_ones(tmp_path):
    write_tiny_bundle(tmp_path / "healthy", seed=0)
    healthy = serve_traffic(tmp_path / "healthy")
    sharp = serve_traffic(collapsed_bundle(tmp_path / "sharp", merged=False).parent)
    collapsed = serve_traffic(collapsed_bundle(tmp_path / "collapsed", merged=True).parent)

    for metrics in (healthy, sharp, collapsed):
        # 40 users with windows of 2+ items; the one-item window and the fallback do not count
        assert metrics["remi_routing_peak_count"][()] == 40
        # 40 lists of 10 model items + 1 one-item user's list (fallback items have no slot)
        assert sum(metrics["remi_items_by_interest_total"].values()) == 410

    def mean_peak(metrics):
        return metrics["remi_routing_peak_sum"][()] / metrics["remi_routing_peak_count"][()]

    assert mean_peak(healthy) < 0.5  # interests mix several history items
    assert mean_peak(sharp) > 0.95 and mean_peak(collapsed) > 0.95  # each interest one item
    for spread in (healthy, sharp):  # distinct interests share the lists
        assert slot_shares(spread).max() < 0.6 and (slot_shares(spread) > 0.05).sum() >= 3
    assert slot_shares(collapsed).tolist() == [1.0, 0.0, 0.0, 0.0]  # one slot answers all


def test_coverage_counts_distinct_served_items(tmp_path):
    write_tiny_bundle(tmp_path / "b", seed=0, popularity_size=50)
    settings = Settings(bundle_root=tmp_path / "b", redis_url=dead_redis_url(), reload_interval_s=0)
    with TestClient(create_app(settings)) as client:
        for _ in range(3):  # the same list three times: 5 distinct items
            client.post("/recommend", json={"history": ITEMS[:4], "n": 5})
        metrics = scrape(client)
        assert metrics["remi_served_items_distinct"][(("window", "current"),)] == 5
        assert metrics["remi_catalogue_coverage"][()] == pytest.approx(5 / 200)
        body = client.post("/recommend", json={"history": ["nobody"], "n": 7}).json()
        assert body["fallback"] is True  # popular items are served items too
        returned = client.post("/recommend", json={"history": ITEMS[:4], "n": 5}).json()["items"]
        fresh = {i["item_id"] for i in body["items"]} - {i["item_id"] for i in returned}
        metrics = scrape(client)
        assert metrics["remi_served_items_distinct"][(("window", "current"),)] == 5 + len(fresh)


def test_an_idle_workers_coverage_gauges_keep_moving():
    # Under --workers N a worker writes its gauges when it serves or answers a scrape; one that
    # does neither showed its last counts for good. Its background task rewrites them.
    import asyncio

    from service.metrics import Metrics

    metrics = Metrics(coverage_window_s=0.05)
    metrics.interests.set_model(num_rows=11, num_interests=2)
    metrics.interests.window.add(np.array([1, 2, 3]))
    metrics.interests.refresh()

    def gauge(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)  # no refresh, unlike a scrape

    assert gauge("remi_served_items_distinct", window="current") == 3

    async def idle_for(seconds: float) -> None:
        task = asyncio.create_task(metrics.keep_gauges_current(interval_s=0.02))
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(idle_for(0.25))  # five windows with no traffic
    assert gauge("remi_served_items_distinct", window="current") == 0
    assert gauge("remi_served_items_distinct", window="last") == 0
    assert gauge("remi_catalogue_coverage") == 0


def test_a_batch_of_a_replaced_model_leaves_the_new_models_coverage_alone():
    # A batch still computing when a reload swapped the model was recorded after it: the old
    # catalogue's rows landed in the new model's fresh window (coverage 1.0 of a model that had
    # served nothing) and its slots in the new model's counts.
    from service.metrics import Metrics
    from service.recommender import Result

    def answer(rows: list[int]) -> Result:
        return Result(
            item_ids=[f"i{r}" for r in rows], scores=[1.0] * len(rows), interests=[0] * len(rows),
            unknown_ids=[], known_count=2, fallback=False, rows=np.array(rows),
        )  # fmt: skip

    metrics = Metrics()
    metrics.set_model("v1", 0.0, num_rows=11, num_interests=2)
    metrics.set_model("v2", 1.0, num_rows=5, num_interests=2)
    metrics.record_batch("v1", 1, [answer([1, 2, 3, 4])], False)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("remi_served_items_distinct", window="current") == 0
    assert not sample("remi_items_by_interest_total", interest="0")
    assert sample("remi_recommendations_total") == 1  # it was still answered
    metrics.record_batch("v2", 1, [answer([1, 2])], False)
    assert sample("remi_served_items_distinct", window="current") == 2
    assert sample("remi_items_by_interest_total", interest="0") == 2
    # Recorded while the swap is under way, it waits for it, then sees the new version.
    with metrics._model_lock:
        late = threading.Thread(target=metrics.record_batch, args=("v2", 1, [answer([3])], False))
        late.start()
        late.join(0.2)
        assert late.is_alive() and sample("remi_served_items_distinct", window="current") == 2
    late.join()
    assert sample("remi_served_items_distinct", window="current") == 3
