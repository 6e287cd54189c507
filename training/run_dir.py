"""A training run's directory: the one place that knows its file names.

A run directory describes itself, so a run can be evaluated, exported or resumed from it alone:

    config.json        {"train": TrainConfig fields, "data": dataset summary}
    dataset/           the prepared dataset the run trained on (SequenceDataset.save)
    metrics.jsonl      one line per validation: iteration, loss, seconds, valid/<metric>, ...
    best.safetensors   weights of the best validation checkpoint; best.json says which it was
    last.pt            the latest validation's full state, for --resume
    result.json        the finished run's summary (valid/test metrics, iterations, seconds, ...)
    .lock              flocked by the one process training here (`RunDir.training`)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.data import DataError, SequenceDataset


class RunError(Exception):
    """A directory that is not (or not yet) a usable training run; the message says why."""


class _File:
    """A file of the run directory: `run.config` is `run.path / "config.json"`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run: RunDir, owner: type) -> Path:
        return run.path / self.name


@dataclass(frozen=True)
class RunDir:
    """Paths of a run's files, and readers for the ones other commands need."""

    path: Path

    config = _File("config.json")
    dataset = _File("dataset")
    metrics = _File("metrics.jsonl")
    best = _File("best.json")
    last = _File("last.pt")
    result = _File("result.json")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def weights(self, which: str = "best") -> Path:
        """best.safetensors (the best validation checkpoint) or another saved set of weights."""
        return self.path / f"{which}.safetensors"

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Hold the directory for one training process (an flock on .lock, released when the
        process ends however it ends): a second `train` or `--resume` there fails at once
        instead of mixing its settings, weights and log with the first's."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / ".lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"{self.path}: another process is training in this run directory"
                ) from None
            yield

    def exists(self) -> bool:
        """Whether a run was started here (its config.json is written first)."""
        return self.config.is_file()

    def status(self) -> str:
        """'finished', 'started' (running, or interrupted: it resumes from last.pt) or 'not run'."""
        if self.result.is_file():
            return "finished"
        return "started" if self.last.is_file() else "not run"

    def read_config(self) -> dict[str, Any]:
        """config.json as written by the trainer."""
        if not self.exists():
            raise RunError(f"{self.path} is not a training run: config.json missing")
        try:
            return json.loads(self.config.read_text())
        except ValueError as exc:
            raise RunError(f"{self.config}: {exc}") from None

    def train_config(self) -> TrainConfig:
        try:
            return TrainConfig.from_dict(self.read_config()["train"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{self.config}: no valid training settings ({exc})") from None

    def load_dataset(self) -> SequenceDataset:
        try:
            return SequenceDataset.load(self.dataset)
        except DataError as exc:
            raise RunError(f"{self.path}: {exc}") from None

    def read_result(self) -> dict[str, Any]:
        """result.json of a finished run; {} while the run has not finished."""
        if not self.result.is_file():
            return {}
        try:
            result = json.loads(self.result.read_text())
        except (ValueError, OSError) as exc:
            raise RunError(f"{self.result}: {exc}") from None
        if not isinstance(result, dict):
            raise RunError(f"{self.result}: not a run's result (a JSON object)")
        return result

    def read_metrics(self) -> list[dict[str, Any]]:
        """The validation log, oldest first."""
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]
