"""`remi-train`: prepare data, train, evaluate, export and publish REMI bundles.

Settings can come from a config file (`--config`, JSON, YAML or TOML with optional `data:`,
`train:` and `export:` sections); flags given on the command line override it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tomllib
import typer
import yaml

from remi_core.bundle import BundleError, load_bundle
from training.data import DataConfig, DataError, SequenceDataset, load_dataset
from training.evaluate import evaluate_model, evaluate_popularity, make_eval_set
from training.export import evaluate_bundle, export_run
from training.trainer import TrainConfig, load_run, train

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("remi-train")
T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (JSON/YAML/TOML); flags override it."),
]
# Data options
SourceOpt = Annotated[
    str | None,
    typer.Option("--data", help="'synthetic' or a CSV/Parquet/sequence/.inter file (.gz ok)."),
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="auto, csv, parquet, seq or inter.")
]
UserColOpt = Annotated[str | None, typer.Option("--user-col", help="User column (CSV/Parquet).")]
ItemColOpt = Annotated[str | None, typer.Option("--item-col", help="Item column (CSV/Parquet).")]
TimeColOpt = Annotated[str | None, typer.Option("--time-col", help="Time column (CSV/Parquet).")]
MinCountOpt = Annotated[
    int | None, typer.Option("--min-count", help="Drop items, then users, with fewer interactions.")
]
SplitSeedOpt = Annotated[
    int | None, typer.Option("--split-seed", help="Seed of the 8:1:1 user split (official: 1230).")
]
SynthUsersOpt = Annotated[
    int | None, typer.Option("--synthetic-users", help="Users in the synthetic dataset.")
]
DatasetDirOpt = Annotated[
    Path | None,
    typer.Option("--dataset-dir", help="A directory written by `prepare` (instead of --data)."),
]
# Training options
ModelOpt = Annotated[str | None, typer.Option("--model", help="Encoder: comirec-sa.")]
DimOpt = Annotated[int | None, typer.Option("--dim", help="Embedding size d (default 64).")]
InterestsOpt = Annotated[
    int | None, typer.Option("--interests", "-K", help="Interests per user K (default 4).")
]
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", help="History window (default 20).")]
BetaOpt = Annotated[
    float | None, typer.Option("--beta", help="IHN concentration; 0 = plain sampled softmax.")
]
LambdaOpt = Annotated[
    float | None, typer.Option("--rr-lambda", help="Routing-regulariser weight; 0 disables RR.")
]
NegOpt = Annotated[
    int | None, typer.Option("--negatives", help="Shared negatives per batch (0 = 10 x batch).")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Batch size (default 128).")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Adam learning rate (default 1e-3).")]
ItersOpt = Annotated[int | None, typer.Option("--max-iters", help="Maximum training steps.")]
EvalEveryOpt = Annotated[
    int | None, typer.Option("--eval-every", help="Validate every N steps (default 200).")
]
PatienceOpt = Annotated[
    int | None, typer.Option("--patience", help="Validations without improvement before stopping.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Training seed.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
# Export options
FactoryOpt = Annotated[
    str | None,
    typer.Option(
        "--index-factory", help="Faiss index factory: Flat (exact), HNSW32, IVF1024,PQ16."
    ),
]
SearchParamsOpt = Annotated[
    str | None, typer.Option("--search-params", help="Faiss search parameters, e.g. nprobe=16.")
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise _fail(f"--config: {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise _fail(f"--config: cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(f"--config: {path} must hold a mapping")
    return data


def _settings(cls: type[T], config: dict[str, Any], section: str, **flags: Any) -> T:
    """Dataclass from a config section, overridden by the flags that were given."""
    values = dict(config.get(section, {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise _fail(f"--config: unknown {section} setting(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise _fail(f"--config: {exc}") from None


def _dataset(dataset_dir: Path | None, config: dict[str, Any], **flags: Any) -> SequenceDataset:
    try:
        if dataset_dir is not None:
            return SequenceDataset.load(dataset_dir)
        cfg = _settings(DataConfig, config, "data", **flags)
        return load_dataset(cfg)
    except DataError as exc:
        raise _fail(str(exc)) from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@app.command()
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the prepared dataset.")],
    config: ConfigOpt = None,
    data: SourceOpt = None,
    format: FormatOpt = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    time_col: TimeColOpt = None,
    min_count: MinCountOpt = None,
    split_seed: SplitSeedOpt = None,
    synthetic_users: SynthUsersOpt = None,
) -> None:
    """Read interactions, filter, map ids, split users, and save the dataset to --out."""
    dataset = _dataset(
        None, _read_config(config), source=data, format=format, user_col=user_col,
        item_col=item_col, time_col=time_col, min_count=min_count, split_seed=split_seed,
        synthetic_users=synthetic_users,
    )  # fmt: skip
    dataset.save(out)
    _echo_json(dataset.summary())


@app.command("train")
def train_cmd(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where checkpoints and logs go.")],
    config: ConfigOpt = None,
    data: SourceOpt = None,
    format: FormatOpt = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    time_col: TimeColOpt = None,
    min_count: MinCountOpt = None,
    split_seed: SplitSeedOpt = None,
    synthetic_users: SynthUsersOpt = None,
    dataset_dir: DatasetDirOpt = None,
    model: ModelOpt = None,
    dim: DimOpt = None,
    interests: InterestsOpt = None,
    seq_len: SeqLenOpt = None,
    beta: BetaOpt = None,
    rr_lambda: LambdaOpt = None,
    negatives: NegOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    max_iters: ItersOpt = None,
    eval_every: EvalEveryOpt = None,
    patience: PatienceOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from --run-dir/last.pt.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a REMI model (ComiRec-SA + IHN + RR) and keep the best validation checkpoint."""
    settings = _read_config(config)
    if resume:
        if not (run_dir / "config.json").is_file():
            raise _fail(f"--resume: {run_dir} holds no run (config.json missing)")
        stored = json.loads((run_dir / "config.json").read_text())["train"]
        cfg = TrainConfig.from_dict(stored)
        if max_iters is not None:  # the one setting a resumed run may change: how far to go
            cfg = replace(cfg, max_iters=max_iters)
        dataset = SequenceDataset.load(run_dir / "dataset")
    else:
        dataset = _dataset(
            dataset_dir, settings, source=data, format=format, user_col=user_col,
            item_col=item_col, time_col=time_col, min_count=min_count, split_seed=split_seed,
            synthetic_users=synthetic_users,
        )  # fmt: skip
        cfg = _settings(
            TrainConfig, settings, "train", model_type=model, dim=dim, num_interests=interests,
            seq_len=seq_len, beta=beta, rr_lambda=rr_lambda, num_negatives=negatives,
            batch_size=batch_size, lr=lr, max_iters=max_iters, eval_every=eval_every,
            patience=patience, seed=seed, device=device,
        )  # fmt: skip
    typer.echo(f"data: {json.dumps(dataset.summary())}", err=True)
    try:
        result = train(dataset, cfg, run_dir, resume=resume, progress=progress)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _echo_json(
        {
            "run_dir": str(result.run_dir),
            "best_iteration": result.best_iteration,
            "iterations": result.iterations,
            "seconds": round(result.seconds, 2),
            "valid": result.valid,
            "test": result.test,
            "most_popular_test": result.popularity_test,
        }
    )


@app.command()
def evaluate(
    path: Annotated[
        Path, typer.Argument(help="A run directory, a bundle version or a bundle root.")
    ],
    split: Annotated[str, typer.Option(help="valid or test.")] = "test",
    dataset_dir: Annotated[
        Path | None,
        typer.Option("--dataset-dir", help="Dataset to evaluate a bundle on (default: the run's)."),
    ] = None,
) -> None:
    """Recall/HitRate/NDCG@20,50 of a run or a bundle, beside the most-popular baseline."""
    if split not in ("valid", "test"):
        raise _fail("--split must be 'valid' or 'test'")
    if (path / "config.json").is_file():
        model, dataset, cfg = load_run(path)
        if dataset_dir is not None:
            raise _fail("--dataset-dir applies to bundles; a run is evaluated on its own data")
        users = dataset.valid if split == "valid" else dataset.test
        eval_set = make_eval_set(dataset, users, cfg.seq_len)
        metrics = evaluate_model(model, eval_set)
    else:
        if dataset_dir is None:
            raise _fail("--dataset-dir is required to evaluate a bundle")
        try:
            bundle = load_bundle(path)
        except BundleError as exc:
            raise _fail(str(exc)) from None
        dataset = SequenceDataset.load(dataset_dir)
        metrics = evaluate_bundle(bundle, dataset, split)
        users = dataset.valid if split == "valid" else dataset.test
        eval_set = make_eval_set(dataset, users, bundle.config.seq_len)
    popular = evaluate_popularity(dataset.popularity(), eval_set)
    _echo_json({"split": split, "users": len(users), "model": metrics, "most_popular": popular})


@app.command()
def export(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Training run to export.")],
    bundle_root: Annotated[Path, typer.Option("--bundle-root", help="Bundle root directory.")],
    config: ConfigOpt = None,
    index_factory: FactoryOpt = None,
    search_params: SearchParamsOpt = None,
    publish: Annotated[bool, typer.Option(help="Point `current` at the new version.")] = True,
) -> None:
    """Write the run's best checkpoint as a new bundle version (and publish it)."""
    settings = _read_config(config).get("export", {})
    factory = index_factory or settings.get("index_factory", "Flat")
    params = search_params if search_params is not None else settings.get("search_params", "")
    if not (run_dir / "config.json").is_file():
        raise _fail(f"--run-dir: {run_dir} is not a training run (config.json missing)")
    try:
        path = export_run(run_dir, bundle_root, factory, params, publish=publish)
    except (ValueError, FileNotFoundError, BundleError) as exc:
        raise _fail(str(exc)) from None
    _echo_json({"bundle": str(path), "published": publish})


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
