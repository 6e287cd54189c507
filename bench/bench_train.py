"""Training throughput and time-to-quality.

    python bench/bench_train.py                                   # synthetic data, pipelines only
    python bench/bench_train.py --data ../shared/data/amazon_beauty/Beauty.txt.gz \
        --target-hr50 0.2262 --time-budget 600                    # + time to the official HR@50

Part 1 compares two input pipelines feeding the same REMI training step, in one run:
  - "python loop": the official code's approach, a Python iterator that draws users and cut
    points with `random`, builds padded lists and copies each batch to the device;
  - "on device": our BatchSampler, all sequences resident on the device, sampling by indexing.
It prints iterations per second of each and their ratio.

On a CPU it also measures, in the same process, the training step and the validation scoring
before and after `keep_freed_memory()` (glibc keeps freed gradient buffers mapped) and with the
old fixed 512-user scoring block against the block sized to the device.

Part 2 (with --target-hr50) trains with the shipped defaults and reports the wall-clock seconds
(validation included) until the test HitRate@50 first reaches the target.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from remi_core.models import build_encoder
from remi_core.retrieval import dense_merged_topk
from training.data import DataConfig, load_dataset
from training.evaluate import evaluate_model, make_eval_set
from training.trainer import (
    MIN_CUT,
    BatchSampler,
    Objective,
    TrainConfig,
    keep_freed_memory,
    make_optimizer,
    resolve_device,
)


class PythonLoopSampler:
    """The official pipeline's shape: Python-level sampling and list building per batch."""

    def __init__(self, dataset, seq_len: int, device: torch.device, seed: int) -> None:
        self.seqs = [dataset.sequences[u].tolist() for u in dataset.train]
        self.seqs = [s for s in self.seqs if len(s) > MIN_CUT]
        self.seq_len, self.device, self.rng = seq_len, device, random.Random(seed)

    def sample(self, batch_size: int, _generator=None):
        items, mask, target = [], [], []
        for _ in range(batch_size):
            seq = self.rng.choice(self.seqs)
            cut = self.rng.choice(range(MIN_CUT, len(seq)))
            hist = seq[max(0, cut - self.seq_len) : cut]
            pad = self.seq_len - len(hist)
            items.append(hist + [0] * pad)
            mask.append([True] * len(hist) + [False] * pad)
            target.append(seq[cut])
        as_tensor = lambda x, dt: torch.tensor(x, dtype=dt).to(self.device)  # noqa: E731
        return (
            as_tensor(items, torch.long),
            as_tensor(mask, torch.bool),
            as_tensor(target, torch.long),
        )


class Trainer:
    """The training step exactly as the trainer runs it (model, REMI objective, optimiser)."""

    def __init__(self, dataset, cfg: TrainConfig, device) -> None:
        torch.manual_seed(cfg.seed)
        self.model = build_encoder(cfg.encoder_config(dataset.num_items)).to(device)
        self.objective = Objective(self.model, cfg)
        self.optimizer = make_optimizer(self.model, cfg)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.cfg, self.device, self.num_items = cfg, device, dataset.num_items

    def step(self, sampler) -> None:
        items, mask, target = sampler.sample(self.cfg.batch_size, self.generator)
        negatives = torch.randint(
            1, self.num_items, (self.cfg.negatives,), device=self.device, generator=self.generator
        )
        loss = self.objective(items, mask, target, negatives)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def throughput(sampler, dataset, cfg: TrainConfig, device, steps: int) -> float:
    trainer = Trainer(dataset, cfg, device)
    for _ in range(20):  # warm-up
        trainer.step(sampler)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(sampler)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def sampling_rate(sampler, batch_size: int, device, steps: int) -> float:
    """Batches per second of the input pipeline alone: the ceiling it puts on a fast step."""
    generator = torch.Generator(device=device).manual_seed(0)
    sampler.sample(batch_size, generator)
    start = time.perf_counter()
    for _ in range(steps):
        sampler.sample(batch_size, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


@torch.inference_mode()
def scoring_seconds(model, eval_set, chunk: int | None, repeats: int = 3) -> float:
    """Best-of-n seconds to score every held-out user exactly (Eq. 7 over the full catalogue)."""
    model.eval()
    interests, _ = model(eval_set.items, eval_set.mask)  # (U, K, d)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dense_merged_topk(interests, model.item_table(), 50, chunk=chunk)
        times.append(time.perf_counter() - start)
    model.train()
    return min(times)


def cpu_memory_effects(dataset, cfg: TrainConfig, sampler, steps: int) -> None:
    """Step and validation speed with glibc's defaults, then after keep_freed_memory()."""
    device = torch.device("cpu")
    valid = make_eval_set(dataset, dataset.valid, cfg.seq_len)
    model = build_encoder(cfg.encoder_config(dataset.num_items))  # scoring cost needs no training
    step_default = throughput(sampler, dataset, cfg, device, steps)
    score_default = scoring_seconds(model, valid, chunk=512)
    keep_freed_memory()
    step_kept = throughput(sampler, dataset, cfg, device, steps)
    score_kept = scoring_seconds(model, valid, chunk=512)
    score_sized = scoring_seconds(model, valid, chunk=None)
    print("CPU memory (training step it/s; exact scoring of the validation users, s):")
    blocks = "(512-user blocks)"
    print(f"  glibc defaults:      {step_default:8.1f} it/s   {score_default:6.3f} s {blocks}")
    print(
        f"  keep_freed_memory(): {step_kept:8.1f} it/s   {score_kept:6.3f} s {blocks}"
        f"   ({step_kept / step_default:.2f}x, {score_default / score_kept:.2f}x)"
    )
    print(
        f"  + blocks sized to the cache:               {score_sized:6.3f} s"
        f"   ({score_default / score_sized:.2f}x over the defaults)"
    )


def time_to_quality(dataset, cfg: TrainConfig, device, target: float, budget: float) -> None:
    trainer = Trainer(dataset, cfg, device)
    sampler = BatchSampler(dataset, cfg.seq_len, device)
    valid = make_eval_set(dataset, dataset.valid, cfg.seq_len).to(device)
    test = make_eval_set(dataset, dataset.test, cfg.seq_len).to(device)
    start, it = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        trainer.step(sampler)
        it += 1
        if it % cfg.eval_every == 0:
            evaluate_model(trainer.model, valid)  # the validation a real run pays for, timed too
            hr50 = evaluate_model(trainer.model, test)["hitrate@50"]
            elapsed = time.perf_counter() - start
            print(f"  iter {it:6d}  {elapsed:7.1f} s  test HR@50 {hr50:.4f}")
            if hr50 >= target:
                print(f"time to HR@50 >= {target}: {elapsed:.1f} s ({it} iterations)")
                return
    print(f"target HR@50 {target} not reached within {budget:.0f} s ({it} iterations)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic", help="synthetic or a dataset file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per pipeline")
    parser.add_argument("--target-hr50", type=float, default=None)
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dataset = load_dataset(DataConfig(source=args.data))
    cfg = TrainConfig(device=str(device))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"device: {device} ({name}), torch {torch.__version__}; data: {dataset.summary()['name']}"
        f" ({len(dataset.train)} train users, {dataset.num_items - 1} items)"
    )
    on_device = BatchSampler(dataset, cfg.seq_len, device)
    if device.type == "cpu":  # first, while glibc still has its default settings
        cpu_memory_effects(dataset, cfg, on_device, args.steps)
    python_loop = PythonLoopSampler(dataset, cfg.seq_len, device, cfg.seed)
    slow_pipe = sampling_rate(python_loop, cfg.batch_size, device, args.steps)
    fast_pipe = sampling_rate(on_device, cfg.batch_size, device, args.steps)
    print("input pipeline alone (batches/s):")
    print(f"  python loop: {slow_pipe:10.1f}")
    print(f"  on device:   {fast_pipe:10.1f}   ({fast_pipe / slow_pipe:.1f}x)")
    print("full training step (it/s):")
    fast = throughput(on_device, dataset, cfg, device, args.steps)
    slow = throughput(python_loop, dataset, cfg, device, args.steps)
    print(f"  python loop: {slow:10.1f}")
    print(f"  on device:   {fast:10.1f}   ({fast / slow:.2f}x)")
    if args.target_hr50 is not None:
        time_to_quality(dataset, cfg, device, args.target_hr50, args.time_budget)


if __name__ == "__main__":
    main()
