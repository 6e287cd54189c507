"""Cross-request micro-batching (service/batcher.py) on a real tiny bundle."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from remi_core.bundle import resolve_current
from service.batcher import MicroBatcher
from service.errors import ShuttingDown
from service.recommender import LoadedModel, load_model, recommend_batch
from tests.helpers import same_response, tiny_item_ids, write_tiny_bundle


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("batching")
    write_tiny_bundle(root)
    return load_model(resolve_current(root))


def seeded_requests(count: int, seed: int = 0) -> list[dict]:
    """Requests with their own n, exclude_history and explain, some with unknown ids and one
    with nothing known (the popularity fallback)."""
    rng = np.random.default_rng(seed)
    ids = tiny_item_ids()[1:]
    requests = []
    for i in range(count):
        history = [ids[j] for j in rng.integers(0, len(ids), rng.integers(1, 25))]
        if i % 5 == 3:
            history.append("not-in-catalogue")
        requests.append(
            {
                "histories": [history] if i != 7 else [["unknown-a", "unknown-b"]],
                "n": [int(rng.integers(1, 60))],
                "exclude_history": [bool(i % 2)],
                "explain": [i % 3 == 0],
            }
        )
    # One request carrying several users, as POST /recommend/batch does.
    requests.append(
        {
            "histories": [[ids[1], ids[2]], [ids[3]], [ids[4], ids[4], ids[5]]],
            "n": [3, 200, 10],
            "exclude_history": [True, False, True],
            "explain": [False, True, False],
        }
    )
    return requests


async def submit_all(batcher: MicroBatcher, model: LoadedModel, requests: list[dict]):
    async with batcher:
        calls = [batcher.submit(model, render=lambda results: results, **r) for r in requests]
        return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_batched_answers_equal_unbatched(model: LoadedModel, workers: int) -> None:
    requests = seeded_requests(20)
    batcher = MicroBatcher(max_wait_ms=50, max_users=64, workers=workers)
    answers = asyncio.run(submit_all(batcher, model, requests))
    # Gathered: far fewer encode-and-search batches than requests.
    assert batcher.stats.batches < len(requests) / 2, batcher.stats
    assert batcher.stats.largest > 1
    for request, answer in zip(requests, answers, strict=True):
        alone = recommend_batch(model, **request)
        assert same_response(answer, alone)
        assert [len(r.item_ids) for r in answer] == [
            min(n, len(r.item_ids)) for n, r in zip(request["n"], answer, strict=True)
        ]


def test_unbatched_mode_runs_one_request_at_a_time(model: LoadedModel) -> None:
    requests = seeded_requests(6, seed=1)
    batcher = MicroBatcher(max_wait_ms=0, max_users=1)
    answers = asyncio.run(submit_all(batcher, model, requests))
    assert batcher.stats.batches == len(requests)  # the 3-user request runs alone, unsplit
    for request, answer in zip(requests, answers, strict=True):
        assert same_response(answer, recommend_batch(model, **request))


def test_a_failing_request_does_not_fail_its_neighbours(model: LoadedModel) -> None:
    requests = seeded_requests(8, seed=2)
    bad = {**requests[2], "n": [0]}  # recommend_batch refuses n < 1: this whole batch fails
    requests[2] = bad
    batcher = MicroBatcher(max_wait_ms=50, max_users=64)
    answers = asyncio.run(submit_all(batcher, model, requests))
    assert isinstance(answers[2], ValueError) and "n must be at least 1" in str(answers[2])
    for i, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        if i != 2:
            assert same_response(answer, recommend_batch(model, **request))


def test_a_failing_render_fails_only_its_request(model: LoadedModel) -> None:
    requests = seeded_requests(4, seed=3)

    def broken(results):
        raise RuntimeError("cannot render")

    async def run():
        async with MicroBatcher(max_wait_ms=50, max_users=64) as batcher:
            calls = [
                batcher.submit(model, render=broken if i == 1 else (lambda r: r), **request)
                for i, request in enumerate(requests)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(run())
    assert isinstance(answers[1], RuntimeError)
    assert all(isinstance(a, list) for i, a in enumerate(answers) if i != 1)


def test_a_request_after_shutdown_is_a_503_not_a_500(model: LoadedModel) -> None:
    request = seeded_requests(1, seed=4)[0]

    async def run():
        batcher = MicroBatcher(max_wait_ms=0, max_users=8)
        batcher.start()
        await batcher.aclose()
        return await batcher.submit(model, render=lambda r: r, **request)

    with pytest.raises(ShuttingDown) as raised:
        asyncio.run(run())
    assert raised.value.status_code == 503


def test_models_of_a_reload_batch_separately(model: LoadedModel, tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path, seed=5)
    other = load_model(resolve_current(tmp_path))
    requests = seeded_requests(6, seed=4)

    async def run():
        async with MicroBatcher(max_wait_ms=50, max_users=64) as batcher:
            calls = [
                batcher.submit(other if i % 2 else model, render=lambda r: r, **request)
                for i, request in enumerate(requests)
            ]
            return await asyncio.gather(*calls)

    for i, (request, answer) in enumerate(zip(requests, asyncio.run(run()), strict=True)):
        assert same_response(answer, recommend_batch(other if i % 2 else model, **request))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=-1, max_users=4)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=1, max_users=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=1, max_users=4, workers=0)
