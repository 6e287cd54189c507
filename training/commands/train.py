"""Commands for one model: prepare the data, train, evaluate, export a bundle."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from remi_core.bundle import load_bundle
from training.commands.options import (
    AmpOpt,
    BatchOpt,
    BetaOpt,
    CliError,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    DimOpt,
    EvalEveryOpt,
    FactoryOpt,
    FormatOpt,
    InterestsOpt,
    ItemColOpt,
    ItersOpt,
    LambdaOpt,
    LrOpt,
    MinCountOpt,
    ModelOpt,
    NegOpt,
    PatienceOpt,
    RoutingGradOpt,
    SearchParamsOpt,
    SeedOpt,
    SeqLenOpt,
    SourceOpt,
    SplitSeedOpt,
    SynthUsersOpt,
    TimeColOpt,
    UserColOpt,
    WdOpt,
    echo_json,
    read_config,
    settings,
)
from training.config import TrainConfig
from training.data import DataConfig, SequenceDataset, load_dataset
from training.evaluate import evaluate_bundle, evaluate_model, evaluate_popularity, make_eval_set
from training.export import ExportConfig, export_run
from training.run_dir import RunDir, RunError
from training.trainer import load_run, train

DatasetDirOpt = Annotated[
    Path | None,
    typer.Option("--dataset-dir", help="A directory written by `prepare` (instead of --data)."),
]


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
    cfg = settings(
        DataConfig, read_config(config), "data", source=data, format=format, user_col=user_col,
        item_col=item_col, time_col=time_col, min_count=min_count, split_seed=split_seed,
        synthetic_users=synthetic_users,
    )  # fmt: skip
    dataset = load_dataset(cfg)
    dataset.save(out)
    echo_json(dataset.summary())


def train_command(
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
    routing_grad: RoutingGradOpt = None,
    negatives: NegOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    weight_decay: WdOpt = None,
    max_iters: ItersOpt = None,
    eval_every: EvalEveryOpt = None,
    patience: PatienceOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    amp: AmpOpt = None,
    compile: CompileOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --run-dir from its last.pt.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a REMI model (ComiRec-SA + IHN + RR) and keep the best validation checkpoint."""
    file = read_config(config)
    if resume:
        # The run's own settings and data; the one thing a resumed run may change is how far.
        run = RunDir(run_dir)
        if not run.exists():
            raise CliError(f"--resume: {run_dir} holds no run (config.json missing)")
        cfg = run.train_config()
        if max_iters is not None:
            cfg = replace(cfg, max_iters=max_iters)
        dataset = run.load_dataset()
    else:
        if dataset_dir is not None:
            dataset = SequenceDataset.load(dataset_dir)
        else:
            dataset = load_dataset(settings(
                DataConfig, file, "data", source=data, format=format, user_col=user_col,
                item_col=item_col, time_col=time_col, min_count=min_count, split_seed=split_seed,
                synthetic_users=synthetic_users,
            ))  # fmt: skip
        cfg = settings(
            TrainConfig, file, "train", model_type=model, dim=dim, num_interests=interests,
            seq_len=seq_len, beta=beta, rr_lambda=rr_lambda, routing_grad=routing_grad,
            num_negatives=negatives, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            max_iters=max_iters, eval_every=eval_every, patience=patience, seed=seed,
            device=device, amp=amp, compile=compile,
        )  # fmt: skip
    typer.echo(f"data: {json.dumps(dataset.summary())}", err=True)
    result = train(dataset, cfg, run_dir, resume=resume, progress=progress)
    echo_json(
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
        raise CliError("--split must be 'valid' or 'test'")
    if RunDir(path).exists():
        if dataset_dir is not None:
            raise CliError("--dataset-dir applies to bundles; a run is evaluated on its own data")
        model, dataset, cfg = load_run(path)
        eval_set = make_eval_set(dataset, dataset.users(split), cfg.seq_len)
        metrics = evaluate_model(model, eval_set)
    else:
        if dataset_dir is None:
            raise CliError("--dataset-dir is required to evaluate a bundle")
        bundle = load_bundle(path)
        dataset = SequenceDataset.load(dataset_dir)
        metrics = evaluate_bundle(bundle, dataset, split)
        eval_set = make_eval_set(dataset, dataset.users(split), bundle.config.seq_len)
    popular = evaluate_popularity(dataset.popularity(), eval_set)
    echo_json({"split": split, "users": len(eval_set), "model": metrics, "most_popular": popular})


def export(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Training run to export.")],
    bundle_root: Annotated[Path, typer.Option("--bundle-root", help="Bundle root directory.")],
    config: ConfigOpt = None,
    index_factory: FactoryOpt = None,
    search_params: SearchParamsOpt = None,
    publish: Annotated[bool, typer.Option(help="Point `current` at the new version.")] = True,
) -> None:
    """Write the run's best checkpoint as a new bundle version (and publish it)."""
    cfg = settings(ExportConfig, read_config(config), "export", index_factory=index_factory,
                   search_params=search_params)  # fmt: skip
    if not RunDir(run_dir).exists():
        raise CliError(f"--run-dir: {run_dir} is not a training run (config.json missing)")
    try:
        path = export_run(run_dir, bundle_root, cfg.index_factory, cfg.search_params,
                          publish=publish)  # fmt: skip
    except RunError as exc:
        raise CliError(f"--run-dir: {exc}") from None
    echo_json({"bundle": str(path), "published": publish})
