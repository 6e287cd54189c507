"""Cross-request micro-batching (service/batcher.py) on a real tiny bundle."""

import asyncio
import gc
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from remi_core.bundle import resolve_current
from remi_core.models import MODEL_TYPES
from service.app import _compute_threads
from service.batcher import MicroBatcher
from service.errors import ClientGone, ShuttingDown
from service.recommender import LoadedModel, load_model, recommend_batch
from service.settings import Settings
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


@pytest.mark.parametrize("exact_search", ["dense", "screened-int8"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(("seq_len", "dim"), [(20, 64), (10, 64), (2, 64), (10, 256)])
def test_every_model_type_answers_alone_as_in_a_batch(
    tmp_path: Path, model_type: str, exact_search: str, seq_len: int, dim: int
) -> None:
    # youtube-dnn, gru4rec and comirec-dr multiply one row per user, and torch's CPU GEMM picks
    # its summation order by the row count: every user's scores changed in their last bits
    # between a batch of 1 and one of 64, and at near-ties the order of its items. ComiRec-SA
    # and MIND have a row per position, as few as that at short windows (seq_len 10: 63 of 64
    # users' scores changed).
    write_tiny_bundle(tmp_path, model_type=model_type, dim=dim, num_items=2001, seq_len=seq_len)
    model = load_model(resolve_current(tmp_path), exact_search=exact_search)
    rng = np.random.default_rng(1)
    ids = tiny_item_ids(2001)[1:]
    histories = [[ids[j] for j in rng.integers(0, 2000, rng.integers(1, 40))] for _ in range(64)]
    together = recommend_batch(model, histories, n=100)
    for history, answer in zip(histories, together, strict=True):
        alone = recommend_batch(model, [history], n=100)[0]
        assert alone.item_ids == answer.item_ids and alone.scores == answer.scores  # bit for bit


def one_user(i: int) -> dict:
    ids = tiny_item_ids()[1:]
    return {"histories": [[ids[i], ids[i + 1]]], "n": [5], "exclude_history": [False],
            "explain": [False]}  # fmt: skip


async def lopsided_then_stragglers(batcher: MicroBatcher, model: LoadedModel) -> list[int]:
    """A batch of 14, then 2 requests at once and 6 more 50 ms later; returns the batch sizes."""
    sizes: list[int] = []
    batcher.on_batch = lambda version, users, results, on_loop: sizes.append(users)

    def submit(i: int):
        return batcher.submit(model, render=lambda results: results, **one_user(i))

    async with batcher:
        await asyncio.gather(*(submit(i) for i in range(14)))
        early = [asyncio.ensure_future(submit(i)) for i in range(2)]
        await asyncio.sleep(0.05)
        await asyncio.gather(*early, *(submit(i) for i in range(6)))
    return sizes


@pytest.mark.parametrize(("balance_ms", "sizes"), [(0, [14, 2, 6]), (1000, [14, 8])])
def test_a_lopsided_batch_is_followed_by_an_even_share(
    model: LoadedModel, balance_ms: float, sizes: list[int]
) -> None:
    # Right after the batch of 14 the thread is free with 2 queued: half of 14 + 2 is 8, so with
    # a balance window it waits for the 6 that follow (their wait ends as soon as 8 are queued,
    # long before the 1 s bound); without one, the 2 run alone.
    batcher = MicroBatcher(max_wait_ms=0, max_users=64, balance_ms=balance_ms)
    assert asyncio.run(lopsided_then_stragglers(batcher, model)) == sizes


def test_the_balance_window_never_delays_one_client_at_a_time(model: LoadedModel) -> None:
    async def one_by_one(batcher: MicroBatcher) -> float:
        loop = asyncio.get_running_loop()
        async with batcher:
            start = loop.time()
            for i in range(5):
                await batcher.submit(model, render=lambda r: r, **one_user(i))
            return loop.time() - start

    # Each request finds the queue holding what the last batch held (1 user): no wait, where a
    # wrong rule would add the whole 2 s window to every request.
    assert asyncio.run(one_by_one(MicroBatcher(0, 64, balance_ms=2000))) < 1.0


def test_the_balance_window_counts_requests_not_users(model: LoadedModel) -> None:
    async def batch_then_single(batcher: MicroBatcher) -> float:
        loop = asyncio.get_running_loop()
        batch = one_user(0)
        many = {key: value * 50 for key, value in batch.items()}
        async with batcher:
            await batcher.submit(model, render=lambda r: r, **many)
            start = loop.time()
            await batcher.submit(model, render=lambda r: r, **one_user(1))
            return loop.time() - start

    # One client: a request of 50 users, then one of 1. Counted in users, the single was short
    # of an even share (26) and waited out the whole window.
    assert asyncio.run(batch_then_single(MicroBatcher(0, 64, balance_ms=2000))) < 1.0


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


def test_a_failing_metrics_callback_fails_no_request(
    model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Metrics are best effort: a callback that raises (say, a full metrics directory) leaves
    every answer as it was, counts each user once, and is logged once, not once a batch."""
    requests = seeded_requests(6, seed=5)
    calls = []

    def broken(version, users, results, on_loop):
        calls.append(users)
        raise OSError("no space left on device")

    async def run():
        async with MicroBatcher(max_wait_ms=50, max_users=64, on_batch=broken) as batcher:
            first = await asyncio.gather(
                *[batcher.submit(model, render=lambda r: r, **request) for request in requests]
            )
            again = await batcher.submit(model, render=lambda r: r, **requests[0])
            return first, again, batcher.stats

    with caplog.at_level("ERROR", logger="service.batcher"):
        answers, again, stats = asyncio.run(run())
    for request, answer in zip(requests, answers, strict=True):
        assert same_response(answer, recommend_batch(model, **request))
    assert same_response(again, recommend_batch(model, **requests[0]))
    users = sum(len(r["histories"]) for r in requests) + len(requests[0]["histories"])
    assert stats.users == sum(calls) == users
    failures = [r for r in caplog.records if "metrics failed" in r.getMessage()]
    assert len(calls) >= 2 and len(failures) == 1 and "no space left" in caplog.text


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


def test_a_collector_that_dies_fails_its_queue_instead_of_hanging(model: LoadedModel) -> None:
    """Should a bug end the collector, the queued requests and every later one get a 503
    (ShuttingDown), not a wait forever."""

    def broken_take() -> list:
        raise RuntimeError("a bug in the collector")

    async def run() -> tuple[list, bool]:
        batcher = MicroBatcher(max_wait_ms=50, max_users=64)
        batcher._take = broken_take  # type: ignore[method-assign]
        async with batcher:
            calls = [batcher.submit(model, render=lambda r: r, **one_user(i)) for i in range(3)]
            queued = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            running = batcher.running
            with pytest.raises(ShuttingDown, match="not running"):
                await batcher.submit(model, render=lambda r: r, **one_user(0))
        return queued, running

    queued, running = asyncio.run(run())
    assert not running
    assert all(isinstance(e, ShuttingDown) and "batcher stopped" in str(e) for e in queued)


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


def run_in_rounds(
    batcher: MicroBatcher, rounds: list[list[tuple[LoadedModel, dict]]]
) -> tuple[list, list[tuple[int, bool, bool]]]:
    """Submits each round's requests together, one round after the other; returns the answers
    and, per batch, (users, on_loop as reported, whether it ran on the loop's thread)."""
    batches: list[tuple[int, bool, bool]] = []
    loop_thread = threading.get_ident()

    def record(version: str, users: int, results: list, on_loop: bool) -> None:
        batches.append((users, on_loop, threading.get_ident() == loop_thread))

    batcher.on_batch = record

    async def run() -> list:
        answers = []
        async with batcher:
            for requests in rounds:
                calls = [batcher.submit(m, render=lambda r: r, **req) for m, req in requests]
                answers += await asyncio.gather(*calls, return_exceptions=True)
        return answers

    return asyncio.run(run()), batches


def test_one_cpu_runs_small_plain_batches_on_the_loop(model: LoadedModel, tmp_path: Path) -> None:
    """With inline_ms, a model's first batch goes to the thread (nothing measured yet) and its
    plain batches after that run on the loop; explanations, diversity, a deep n, and another
    model's first batch go to the thread; every answer is the unbatched one."""
    write_tiny_bundle(tmp_path, seed=5)
    other = load_model(resolve_current(tmp_path))
    plain = [one_user(i) for i in range(4)]
    heavy = [
        {**one_user(1), "explain": [True]},
        {**one_user(2), "diversity": [0.5]},
        {**one_user(3), "n": [101]},
    ]
    rounds = [[(model, r) for r in plain]] * 3 + [[(model, r)] for r in heavy]
    rounds += [[(other, r) for r in plain]] * 2
    answers, batches = run_in_rounds(MicroBatcher(0, 64, inline_ms=1000), rounds)
    expected = [recommend_batch(m, **r) for requests in rounds for m, r in requests]
    for answer, alone in zip(answers, expected, strict=True):
        assert same_response(answer, alone)
    where = [on_loop for _, on_loop, _ in batches]
    assert where == [False, True, True, False, False, False, False, True]
    assert all(on_loop == on_loop_thread for _, on_loop, on_loop_thread in batches)


def test_a_batch_over_the_loop_budget_goes_to_the_thread(model: LoadedModel) -> None:
    rounds = [[(model, one_user(i)) for i in range(4)]] * 3
    _, batches = run_in_rounds(MicroBatcher(0, 64, inline_ms=1e-6), rounds)
    assert len(batches) == 3 and not any(on_loop for _, on_loop, _ in batches)


def test_a_failing_request_on_the_loop_fails_alone(model: LoadedModel) -> None:
    requests = [one_user(i) for i in range(4)]
    bad = {**requests[2], "n": [0]}  # recommend_batch refuses n < 1: the whole batch fails
    rounds = [[(model, r) for r in requests], [(model, r) for r in requests[:2] + [bad]]]
    answers, batches = run_in_rounds(MicroBatcher(0, 64, inline_ms=1000), rounds)
    assert isinstance(answers[6], ValueError) and "n must be at least 1" in str(answers[6])
    for answer, request in zip(answers[4:6], requests[:2], strict=True):
        assert same_response(answer, recommend_batch(model, **request))
    assert [on_loop for _, on_loop, _ in batches] == [False, True, True]  # retried one by one


def test_the_loop_takes_a_turn_between_its_own_batches(model: LoadedModel) -> None:
    """A backlog of plain requests runs as several batches on the loop; between two of them the
    loop must run (send answers, read /healthz), or it is blocked for several times inline_ms."""
    turns = 0
    seen: list[tuple[bool, int]] = []
    batcher = MicroBatcher(0, 2, inline_ms=1000)
    batcher.on_batch = lambda version, users, results, on_loop: seen.append((on_loop, turns))

    async def run() -> None:
        nonlocal turns

        async def heartbeat() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        async with batcher:
            beat = asyncio.create_task(heartbeat())
            await batcher.submit(model, render=lambda r: r, **one_user(0))  # measures the cost
            await asyncio.gather(
                *(batcher.submit(model, render=lambda r: r, **one_user(i)) for i in range(8))
            )
            beat.cancel()

    asyncio.run(run())
    on_loop = [turn for where, turn in seen[1:] if where]
    assert len(on_loop) == 4  # the backlog of 8 in batches of 2, all on the loop
    assert len(set(on_loop)) == 4, seen  # and the loop turned between every two


def test_popularity_answers_do_not_make_the_loop_estimate_cheap(model: LoadedModel) -> None:
    """A user with nothing known costs next to nothing (no encode, no search): batches of only
    such users say nothing about what a searched user costs, so after them the first batch of
    real users still goes to the thread to be measured."""
    unknown = {**one_user(0), "histories": [["unknown-a", "unknown-b"]]}
    rounds = [[(model, unknown)] * 4] * 2 + [[(model, one_user(i)) for i in range(4)]] * 2
    _, batches = run_in_rounds(MicroBatcher(0, 64, inline_ms=1000), rounds)
    assert [on_loop for _, on_loop, _ in batches] == [False, False, False, True]


def test_the_batcher_lets_a_replaced_model_go(tmp_path: Path) -> None:
    """After a reload the old model's memory (its table, its index) must go once its requests
    are answered, though the loop's cost estimate was measured on it and the collector, now
    waiting for requests, computed its last batch on the loop."""
    write_tiny_bundle(tmp_path, seed=5)
    batcher = MicroBatcher(0, 64, inline_ms=1000)
    where: list[bool] = []
    batcher.on_batch = lambda version, users, results, on_loop: where.append(on_loop)

    async def run() -> bool:
        old = load_model(resolve_current(tmp_path))
        async with batcher:
            for _ in range(2):
                await asyncio.gather(
                    *(batcher.submit(old, render=len, **one_user(i)) for i in range(4))
                )
            gone = weakref.ref(old)
            del old
            gc.collect()
            return gone() is None

    assert asyncio.run(run())
    assert where == [False, True]  # measured on the old model, then its batch on the loop


def test_requests_whose_client_went_away_leave_the_queue(model: LoadedModel) -> None:
    """While a batch computes, two queued clients go away: they get ClientGone at once, and
    the next batch holds only the client still waiting."""
    sizes: list[int] = []
    batcher = MicroBatcher(0, 64, on_batch=lambda _, users, results, on_loop: sizes.append(users))

    started, release = threading.Event(), threading.Event()

    def slow(results):  # the first batch's render holds the compute thread until released
        started.set()
        release.wait(10)
        return results

    async def run() -> list:
        async with batcher:
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(batcher.submit(model, render=slow, **one_user(0)))
            assert await loop.run_in_executor(None, started.wait, 10)  # the first batch computes
            gone = [loop.create_future() for _ in range(3)]
            waiting = [
                asyncio.ensure_future(
                    batcher.submit(model, render=len, client_gone=g, **one_user(i + 1))
                )
                for i, g in enumerate(gone)
            ]
            await asyncio.sleep(0.01)
            gone[0].set_result(None)
            gone[1].set_result(None)
            gone[2].cancel()  # a watch that ended without seeing a disconnect
            await asyncio.sleep(0.01)
            release.set()
            answers = await asyncio.gather(*waiting, return_exceptions=True)
            await first
            return answers

    answers = asyncio.run(run())
    assert [type(a) for a in answers[:2]] == [ClientGone, ClientGone]
    assert answers[2] == 1  # answered: one user rendered
    assert sizes == [1, 1]  # the two who left were never computed


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="one compute thread"):
        MicroBatcher(max_wait_ms=1, max_users=4, workers=2, inline_ms=1)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=1, max_users=4, inline_ms=-1)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=-1, max_users=4)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=1, max_users=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=1, max_users=4, workers=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_wait_ms=1, max_users=4, balance_ms=-1)


def test_a_batch_starts_computing_while_the_loop_is_busy(model: LoadedModel) -> None:
    """The collector hands a batch to the compute thread itself: work already queued on the
    event loop (here one blocking callback; under load, the responses of the batch before)
    must not hold the next batch back."""

    async def scenario() -> tuple[float, float]:
        rendered_at: list[float] = []

        def render(results: list) -> list:
            rendered_at.append(time.perf_counter())
            return results

        async with MicroBatcher(max_wait_ms=0, max_users=8) as batcher:
            answer = asyncio.create_task(batcher.submit(model, render=render, **one_user(1)))
            await asyncio.sleep(0)  # the request queues and wakes the collector
            busy_until: list[float] = []

            def block_the_loop() -> None:
                time.sleep(0.5)
                busy_until.append(time.perf_counter())

            asyncio.get_running_loop().call_soon(block_the_loop)  # runs after the collector
            await answer
        return rendered_at[0], busy_until[0]

    rendered, busy_until = asyncio.run(scenario())
    assert rendered < busy_until  # computed and rendered during the busy stretch, not after


def most_batches_at_once(batcher: MicroBatcher, model: LoadedModel) -> int:
    """Runs 6 one-user requests in batches of one, each held 50 ms in its compute thread;
    returns the most batches that were computing at the same time."""
    lock = threading.Lock()
    computing, most = 0, 0

    def hold(version: str, users: int, results: list, on_loop: bool) -> None:
        nonlocal computing, most
        with lock:
            computing += 1
            most = max(most, computing)
        time.sleep(0.05)
        with lock:
            computing -= 1

    batcher.on_batch = hold
    requests = [one_user(i) for i in range(6)]
    answers = asyncio.run(submit_all(batcher, model, requests))
    for request, answer in zip(requests, answers, strict=True):
        assert same_response(answer, recommend_batch(model, **request))
    return most


@pytest.mark.parametrize(("search", "side_by_side"), [("auto", True), ("faiss", False)])
def test_auto_compute_threads_follow_the_search(
    model: LoadedModel, search: str, side_by_side: bool
) -> None:
    # Torch's exact search runs batches side by side, one per CPU of the worker; an index
    # search (faiss spreads a batch over the cores itself) runs one batch at a time.
    served = model if search == "auto" else load_model(model.path, exact_search=search)
    assert served.batches_side_by_side is side_by_side
    threads, parallel = _compute_threads(Settings(compute_threads=0, torch_threads=1), cpus=2)
    assert threads == 2
    assert parallel(served) == (2 if side_by_side else 1)
    batcher = MicroBatcher(0, 1, workers=threads, parallel=parallel)
    assert most_batches_at_once(batcher, served) == parallel(served)


def test_compute_threads_set_by_hand_hold_for_every_search(model: LoadedModel) -> None:
    served = load_model(model.path, exact_search="faiss")
    threads, parallel = _compute_threads(Settings(compute_threads=3), cpus=2)
    assert (threads, parallel(served), parallel(model)) == (3, 3, 3)
    # Auto with wider torch pools: as many compute threads as fit in the worker's CPUs.
    assert _compute_threads(Settings(torch_threads=2), cpus=4)[0] == 2
    assert _compute_threads(Settings(torch_threads=0), cpus=4)[0] == 1
