"""Training loop: ComiRec-style (user, cut point) sampling, REMI loss, validation, early stopping.

All training sequences live on the training device as one flat tensor with offsets, and batches
and negatives are sampled there, so a step never waits on the host; the loss is read back only
when the progress bar is refreshed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from remi_core.atomic import atomic_file, write_json_atomic
from remi_core.models import (
    MODEL_TYPES,
    EncoderConfig,
    MultiInterestEncoder,
    build_encoder,
    cpu_state_dict,
    select_interest,
)
from training.data import SequenceDataset
from training.evaluate import (
    evaluate_model,
    evaluate_popularity,
    make_eval_set,
    routing_concentration,
)
from training.losses import routing_regularizer, sampled_softmax_ihn

log = logging.getLogger(__name__)

MIN_CUT = 4  # ComiRec samples cut points from position 4 on, so every history has >= 4 items
SELECT_METRIC = "recall@50"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the data and the seed)."""

    model_type: str = "comirec-sa"
    """Encoder architecture."""
    dim: int = 64
    """Embedding size d."""
    num_interests: int = 4
    """K, interests per user."""
    seq_len: int = 20
    """History window read by the encoder."""
    beta: float = 0.1
    """IHN concentration; 0 gives the plain sampled softmax."""
    rr_lambda: float = 100.0
    """Weight of the routing regulariser; 0 disables RR. beta=0, lambda=0 is plain ComiRec-SA."""
    routing_grad: bool = False
    """ComiRec-DR and MIND only: gradients through every dynamic-routing iteration, so RR can
    act on their routing; False is the official stop-gradient (see EncoderConfig)."""
    num_negatives: int = 0
    """Shared uniform negatives per batch; 0 means 10 x batch_size."""
    remove_accidental_hits: bool = True
    """Ignore a sampled negative that is the positive itself (as TensorFlow's sampled softmax)."""
    batch_size: int = 128
    """Training examples per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW); 0 is plain Adam, the official code's optimiser. Without it
    the item table overfits: on Beauty validation Recall@50 peaks early and then falls."""
    max_iters: int = 1_000_000
    """Upper bound on training steps."""
    eval_every: int = 200
    """Validate (Recall@50 on validation users) every this many steps."""
    patience: int = 50
    """Stop after this many validations without improvement."""
    seed: int = 2023
    """Seeds initialisation and sampling; CPU runs with the same seed repeat exactly."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""
    amp: bool = False
    """bfloat16 autocast for the forward pass (weights, Adam and the loss stay float32)."""
    compile: bool = False
    """torch.compile the training step (a one-off compilation; needs a C++ compiler on CPU)."""

    def __post_init__(self) -> None:
        positive = ("dim", "num_interests", "seq_len", "batch_size", "max_iters", "eval_every",
                    "patience")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("beta", "rr_lambda", "num_negatives", "lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, not {self.model_type!r}")
        self.encoder_config(num_items=2)  # architecture checks (routing_grad) fail here, early

    def encoder_config(self, num_items: int) -> EncoderConfig:
        return EncoderConfig(
            num_items=num_items,
            model_type=self.model_type,
            dim=self.dim,
            num_interests=self.num_interests,
            seq_len=self.seq_len,
            routing_grad=self.routing_grad,
        )

    @property
    def negatives(self) -> int:
        return self.num_negatives or 10 * self.batch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {unknown}")
        return cls(**data)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


class BatchSampler:
    """Samples (history window, target) pairs of training users on the device.

    A user is drawn uniformly, then a cut point c uniformly from [4, len - 1]; the history is the
    up to seq_len items before c (right-padded), the target is the item at c.
    """

    def __init__(self, dataset: SequenceDataset, seq_len: int, device: torch.device) -> None:
        seqs = [dataset.sequences[u] for u in dataset.train if len(dataset.sequences[u]) > MIN_CUT]
        if not seqs:
            raise ValueError(f"no training user has more than {MIN_CUT} interactions")
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.flat = torch.as_tensor(np.concatenate(seqs), device=device)
        self.lengths = torch.as_tensor(lengths, device=device)
        self.offsets = torch.as_tensor(
            np.concatenate([[0], np.cumsum(lengths)[:-1]]), device=device
        )
        self.positions = torch.arange(seq_len, device=device)
        self.seq_len = seq_len

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.flat.device
        users = torch.randint(len(self.lengths), (batch_size,), device=device, generator=generator)
        lengths, offsets = self.lengths[users], self.offsets[users]
        span = (lengths - MIN_CUT).float()
        u = torch.rand(batch_size, device=device, generator=generator)
        cut = MIN_CUT + (u * span).long().clamp(max=lengths - 1 - MIN_CUT)  # (B,)
        start = (cut - self.seq_len).clamp(min=0)
        pos = start.unsqueeze(1) + self.positions  # (B, L)
        mask = pos < cut.unsqueeze(1)
        items = torch.where(
            mask, self.flat[offsets.unsqueeze(1) + pos.clamp(max=cut.unsqueeze(1) - 1)], 0
        )
        return items, mask, self.flat[offsets + cut]


def remi_loss(
    model: MultiInterestEncoder,
    items: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, routing regulariser) for one batch."""
    interests, routing = model(items, mask)  # (B, K, d), (B, K, L)
    table = model.item_table()
    target_emb = table[target]  # (B, d)
    user = select_interest(interests, target_emb)  # (B, d)
    # The logits leave autocast in float32: bfloat16's 8-bit mantissa would blur IHN's
    # exp(beta s) weights and the logsumexp over 1,280 negatives.
    pos_logits = (user * target_emb).sum(dim=1).float()  # (B,)
    neg_logits = (user @ table[negatives].T).float()  # (B, L_neg)
    hits = negatives.unsqueeze(0) == target.unsqueeze(1) if cfg.remove_accidental_hits else None
    loss = sampled_softmax_ihn(pos_logits, neg_logits, cfg.beta, hits)
    reg = torch.zeros((), device=loss.device)
    if routing is not None and cfg.rr_lambda:
        reg = routing_regularizer(routing, cfg.dim)
        loss = loss + cfg.rr_lambda * reg
    return loss, reg


def keep_freed_memory() -> None:
    """Stop glibc handing freed multi-MB blocks back to the OS on CPU runs.

    Each step's backward allocates fresh gradient buffers the size of the item table; by default
    glibc returns them to the OS on free, so the next step page-faults them back in (on Beauty,
    a 3 MB table, 60% of a step went to filling those pages). Keeping them mapped gives ~20%
    more steps/s and ~35% faster validation on a 2-core machine; results are unchanged.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 1 << 30)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: ~15% more steps/s on a CPU.
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )


class Objective(nn.Module):
    """The encoder plus REMI's loss as one module, so DistributedDataParallel sees every use of
    the item table (input, target and negatives) inside a single forward."""

    def __init__(self, encoder: MultiInterestEncoder, cfg: TrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg

    def forward(self, items, mask, target, negatives) -> torch.Tensor:
        return remi_loss(self.encoder, items, mask, target, negatives, self.cfg)[0]


@dataclass
class TrainStep:
    """One optimisation step as every run takes it: a batch and the shared negatives sampled on
    the device, REMI's loss (under bfloat16 autocast with cfg.amp), backward, update.

    Nothing in it waits on the host, so steps queue up on a GPU; the returned loss is a device
    tensor for the caller to accumulate.
    """

    objective: nn.Module  # an Objective, possibly wrapped by DDP or torch.compile
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler  # or any object with the same sample()
    generator: torch.Generator  # on the training device
    cfg: TrainConfig
    num_items: int  # catalogue rows including padding row 0

    def __call__(self) -> torch.Tensor:
        device = self.generator.device
        items, mask, target = self.sampler.sample(self.cfg.batch_size, self.generator)
        negatives = torch.randint(
            1, self.num_items, (self.cfg.negatives,), device=device, generator=self.generator
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            loss = self.objective(items, mask, target, negatives)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


@dataclass
class TrainResult:
    run_dir: Path
    best_iteration: int
    valid: dict[str, float]
    test: dict[str, float]
    popularity_test: dict[str, float]
    iterations: int
    seconds: float


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: torch.device) -> tuple[Distributed, torch.device]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(), device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size), device


def train(
    dataset: SequenceDataset,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train an encoder on `dataset`, keeping the best validation checkpoint in `run_dir`.

    The run directory describes itself: config.json (settings and data summary), the prepared
    dataset, metrics.jsonl, best.safetensors (+ best.json) and last.pt for resuming.

    Under torchrun every rank samples its own batches (seeded by rank) and gradients are averaged
    by DistributedDataParallel; each rank validates the identical replica, so all ranks take the
    same early-stopping decision without extra communication, and rank 0 writes the files.
    """
    run_dir = Path(run_dir)
    ddp, device = Distributed.setup(resolve_device(cfg.device))
    if device.type == "cpu":
        keep_freed_memory()
    if resume and not (run_dir / "last.pt").is_file():
        raise FileNotFoundError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
    if ddp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            dataset.save(run_dir / "dataset")
        # Rewritten on resume too, so the file names the max_iters the run now goes to.
        write_json_atomic(
            run_dir / "config.json", {"train": asdict(cfg), "data": dataset.summary()}
        )

    torch.manual_seed(cfg.seed)  # identical initial replicas on every rank
    model = build_encoder(cfg.encoder_config(dataset.num_items)).to(device)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed + ddp.rank)
    sampler = BatchSampler(dataset, cfg.seq_len, device)
    valid_set = make_eval_set(dataset, dataset.valid, cfg.seq_len).to(device)

    state = {"iteration": 0, "best": -math.inf, "best_iteration": 0, "stale": 0}
    if resume:
        state = _load_last(run_dir / "last.pt", model, optimizer, generator, ddp.rank)
        log.info("resumed %s at iteration %d", run_dir, state["iteration"])
    objective: nn.Module = Objective(model, cfg)
    if ddp.world_size > 1:
        objective = DistributedDataParallel(objective)
    if cfg.compile:
        objective = torch.compile(objective)
    step = TrainStep(objective, optimizer, sampler, generator, cfg, dataset.num_items)

    # A fresh run starts a fresh log; a resumed one continues it.
    log_mode = "a" if resume else "w"
    metrics_log = (run_dir / "metrics.jsonl").open(log_mode) if ddp.is_main else None
    # Wall clock of the whole run, earlier sessions of a resumed run included.
    start_time = time.perf_counter() - state.get("seconds", 0.0)
    running = torch.zeros((), device=device)
    steps_since_eval = 0
    bar = tqdm(
        total=cfg.max_iters,
        initial=state["iteration"],
        disable=not (progress and ddp.is_main),
        dynamic_ncols=True,
    )
    model.train()
    try:
        while state["iteration"] < cfg.max_iters and state["stale"] < cfg.patience:
            running += step()
            steps_since_eval += 1
            state["iteration"] += 1
            bar.update(1)

            if state["iteration"] % cfg.eval_every == 0 or state["iteration"] == cfg.max_iters:
                valid = evaluate_model(model, valid_set)
                mean_loss = float(running) / steps_since_eval
                running.zero_()
                steps_since_eval = 0
                if valid[SELECT_METRIC] > state["best"]:
                    state.update(best=valid[SELECT_METRIC], best_iteration=state["iteration"])
                    state["stale"] = 0
                    if ddp.is_main:
                        with atomic_file(run_dir / "best.safetensors") as tmp:
                            save_file(cpu_state_dict(model), str(tmp))
                        best = {"iteration": state["iteration"], "valid": valid}
                        write_json_atomic(run_dir / "best.json", best)
                else:
                    state["stale"] += 1
                state["seconds"] = time.perf_counter() - start_time
                if ddp.is_main:
                    record = {
                        "iteration": state["iteration"],
                        "loss": mean_loss,
                        "seconds": time.perf_counter() - start_time,
                        **{f"valid/{k}": v for k, v in valid.items()},
                        "routing_max": routing_concentration(model, valid_set),
                    }
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                    _save_last(run_dir / "last.pt", model, optimizer, generator, state)
                bar.set_postfix(loss=f"{mean_loss:.4f}", val_r50=f"{valid[SELECT_METRIC]:.4f}")
    finally:
        bar.close()
        if metrics_log is not None:
            metrics_log.close()
    seconds = time.perf_counter() - start_time
    checksums = _replica_checksums(model, ddp)
    if ddp.world_size > 1:
        dist.barrier()  # rank 0 has written best.safetensors

    if not (run_dir / "best.safetensors").is_file():
        raise RuntimeError("training ended before the first validation; raise max_iters")
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
    test_set = make_eval_set(dataset, dataset.test, cfg.seq_len)
    valid = evaluate_model(model, valid_set)
    test = evaluate_model(model, test_set.to(device))
    pop_test = evaluate_popularity(dataset.popularity(), test_set)
    summary = {
        "best_iteration": state["best_iteration"],
        "iterations": state["iteration"],
        "seconds": seconds,
        "valid": valid,
        "test": test,
        "popularity_test": pop_test,
        "device": str(device),
        "world_size": ddp.world_size,
        "replica_checksums": checksums,
    }
    if ddp.is_main:
        write_json_atomic(run_dir / "result.json", summary)
    return TrainResult(
        run_dir, state["best_iteration"], valid, test, pop_test, state["iteration"], seconds
    )


def _replica_checksums(model: nn.Module, ddp: Distributed) -> list[float]:
    """One float per rank summarising its weights: equal values mean the replicas agree."""
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    local = local.reshape(1)
    if ddp.world_size == 1:
        return [float(local)]
    gathered = [torch.zeros_like(local) for _ in range(ddp.world_size)]
    dist.all_gather(gathered, local)
    return [float(x) for x in gathered]


def load_run(
    run_dir: Path, which: str = "best"
) -> tuple[MultiInterestEncoder, SequenceDataset, TrainConfig]:
    """Rebuild a trained encoder, its dataset and its settings from a run directory alone."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: config.json missing")
    cfg = TrainConfig.from_dict(json.loads(config_path.read_text())["train"])
    dataset = SequenceDataset.load(run_dir / "dataset")
    model = build_encoder(cfg.encoder_config(dataset.num_items))
    weights = run_dir / f"{which}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (has the run validated yet?)")
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), dataset, cfg


def _save_last(path, model, optimizer, generator, state) -> None:
    checkpoint = {
        "model": cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        # The global stream drives MIND's random routing start and GRU4Rec's dropout.
        "global_rng": torch.get_rng_state(),
        "state": state,
    }
    if generator.device.type == "cuda":
        checkpoint["global_cuda_rng"] = torch.cuda.get_rng_state(generator.device)
    with atomic_file(path) as tmp:
        torch.save(checkpoint, tmp)


def _load_last(path, model, optimizer, generator, rank: int) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if rank == 0:  # other ranks' streams are not saved; they restart from a rank-salted seed
        generator.set_state(checkpoint["generator"])
    else:
        generator.manual_seed(int(checkpoint["state"]["iteration"]) * 7919 + rank)
    if "global_rng" in checkpoint:  # absent from checkpoints written before it was saved
        torch.set_rng_state(checkpoint["global_rng"])
    if "global_cuda_rng" in checkpoint and generator.device.type == "cuda":
        torch.cuda.set_rng_state(checkpoint["global_cuda_rng"], generator.device)
    return checkpoint["state"]
