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

Part 2 times the step of each `--variants` entry (eager, bfloat16 autocast, torch.compile, and
CUDA graphs through torch.compile's reduce-overhead mode, alone or with autocast) against eager.

Part 3 (with --target-hr50) trains each variant with the shipped defaults and reports the
wall-clock seconds (validation included) until the test HitRate@50 first reaches the target.
Compilation happened in part 2, in the same process, so part 3's times leave it out; part 2
prints it as the warm-up time of each variant.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from dataclasses import replace

from _args import positive_float, positive_int

from remi_core.threads import busy_cpus, describe, prepare_environment, setup_threads

prepare_environment("spin")  # before torch loads its OpenMP runtime

import torch

from remi_core.models import build_encoder
from remi_core.retrieval import dense_merged_topk
from training.data import DataConfig, DataError, load_dataset
from training.evaluate import evaluate_model, make_eval_set
from training.trainer import (
    MIN_CUT,
    BatchSampler,
    Objective,
    TrainConfig,
    TrainStep,
    keep_freed_memory,
    make_optimizer,
    resolve_device,
)

# name -> (bfloat16 autocast, torch.compile mode or None). "reduce-overhead" records the compiled
# forward and backward as CUDA graphs, which removes the per-kernel launch cost of a small step.
VARIANTS = {
    "eager": (False, None),
    "amp": (True, None),
    "compile": (False, "default"),
    "compile+amp": (True, "default"),
    "cudagraphs": (False, "reduce-overhead"),
    "cudagraphs+amp": (True, "reduce-overhead"),
}


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
    """A fresh model trained by the trainer's own TrainStep, in one of the VARIANTS."""

    def __init__(self, dataset, cfg: TrainConfig, device, sampler, variant: str = "eager") -> None:
        amp, compile_mode = VARIANTS[variant]
        cfg = replace(cfg, amp=amp)
        torch.manual_seed(cfg.seed)
        self.model = build_encoder(cfg.encoder_config(dataset.num_items)).to(device)
        objective = Objective(self.model, cfg)
        if compile_mode is not None:
            objective = torch.compile(objective, mode=compile_mode)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        optimizer = make_optimizer(self.model, cfg)
        num_items = dataset.num_items
        self.train_step = TrainStep(objective, optimizer, sampler, generator, cfg, num_items)
        self.cudagraphs = compile_mode == "reduce-overhead"

    def step(self) -> None:
        if self.cudagraphs:  # a new iteration: the graphs may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        self.train_step()


def throughput(sampler, dataset, cfg: TrainConfig, device, steps: int, variant="eager") -> float:
    return timed_steps(sampler, dataset, cfg, device, steps, variant)[0]


def timed_steps(
    sampler, dataset, cfg: TrainConfig, device, steps: int, variant="eager"
) -> tuple[float, float]:
    """(steps per second after warm-up, seconds of the 20 warm-up steps: compilation, graphs)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    trainer = Trainer(dataset, cfg, device, sampler, variant)
    start = time.perf_counter()
    for _ in range(20):
        trainer.step()
    sync()
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    sync()
    return steps / (time.perf_counter() - start), warm_up


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


def time_to_quality(
    dataset, cfg: TrainConfig, device, target: float, budget: float, variant: str
) -> float | None:
    """Seconds from the first step to test HR@50 >= target (None: not within budget)."""
    sampler = BatchSampler(dataset, cfg.seq_len, device)
    valid = make_eval_set(dataset, dataset.valid, cfg.seq_len).to(device)
    test = make_eval_set(dataset, dataset.test, cfg.seq_len).to(device)
    start, it = time.perf_counter(), 0
    trainer = Trainer(dataset, cfg, device, sampler, variant)
    while time.perf_counter() - start < budget:
        trainer.step()
        it += 1
        if it % cfg.eval_every == 0:
            evaluate_model(trainer.model, valid)  # the validation a real run pays for, timed too
            hr50 = evaluate_model(trainer.model, test)["hitrate@50"]
            elapsed = time.perf_counter() - start
            print(f"  {variant}: iter {it:6d}  {elapsed:7.1f} s  test HR@50 {hr50:.4f}")
            if hr50 >= target:
                print(f"  {variant}: HR@50 >= {target} after {elapsed:.1f} s ({it} iterations)")
                return elapsed
    print(f"  {variant}: HR@50 {target} not reached within {budget:.0f} s ({it} iterations)")
    return None


def report_threads(threads: int | None) -> None:
    """Print the thread set-up, and warn when other processes keep the cores busy: the
    variants' ratios then mostly measure the competition."""
    print("threads: " + describe(setup_threads(threads)))
    busy = busy_cpus(1.0)
    if busy is not None and busy > 0.3:
        print(
            f"WARNING: the cores are not idle ({busy:.1f} CPUs busy before the run); the figures "
            "below are noisy and their ratios cannot be trusted"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic", help="synthetic or a dataset file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=positive_int, default=200, help="timed steps per pipeline")
    parser.add_argument("--target-hr50", type=float, default=None)
    parser.add_argument(
        "--time-budget", type=positive_float, default=600.0, help="seconds per variant"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all on CUDA, eager on CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: REMI_THREADS, else the CPUs available)",
    )
    args = parser.parse_args()

    report_threads(args.threads)
    device = resolve_device(args.device)
    default = "eager" if device.type == "cpu" else ",".join(VARIANTS)
    variants = (args.variants or default).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        dataset = load_dataset(DataConfig(source=args.data))
    except DataError as exc:
        parser.error(f"--data: {exc}")
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

    print("training step variants, on-device sampling (it/s; seconds of the first 20 steps):")
    rates, warm_ups = {}, {}
    for variant in variants:
        rates[variant], warm_ups[variant] = timed_steps(
            on_device, dataset, cfg, device, args.steps, variant
        )
    eager = rates.get("eager", fast)  # the same run's eager figure when it was measured
    for variant in variants:
        print(
            f"  {variant:15s} {rates[variant]:10.1f}   ({rates[variant] / eager:.2f}x eager)"
            f"   warm-up {warm_ups[variant]:6.1f} s"
        )

    if args.target_hr50 is not None:
        print(f"time to test HR@50 >= {args.target_hr50} (validation every {cfg.eval_every}):")
        seconds = {
            v: time_to_quality(dataset, cfg, device, args.target_hr50, args.time_budget, v)
            for v in variants
        }
        print("summary: variant, it/s, seconds to target")
        for v in variants:
            reached = "not reached" if seconds[v] is None else f"{seconds[v]:.1f} s"
            print(f"  {v:15s} {rates[v]:10.1f}   {reached}")


if __name__ == "__main__":
    main()
