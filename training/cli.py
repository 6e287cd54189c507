"""`remi-train`: prepare data, train, evaluate, export and publish REMI bundles.

Settings can come from a config file (`--config`, JSON, YAML or TOML with optional `data:`,
`train:` and `export:` sections); flags given on the command line override it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import signal
import sys
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from remi_core.bundle import BundleError, load_bundle
from remi_core.models import MODEL_TYPES
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
ModelOpt = Annotated[
    str | None, typer.Option("--model", help=f"Encoder: {', '.join(MODEL_TYPES)}.")
]
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
RoutingGradOpt = Annotated[
    bool | None,
    typer.Option(
        "--routing-grad/--no-routing-grad",
        help="ComiRec-DR/MIND: backpropagate through dynamic routing so RR can act (default: "
        "the official stop-gradient).",
    ),
]
NegOpt = Annotated[
    int | None, typer.Option("--negatives", help="Shared negatives per batch (0 = 10 x batch).")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Batch size (default 128).")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Adam learning rate (default 1e-3).")]
WdOpt = Annotated[
    float | None,
    typer.Option("--weight-decay", help="Decoupled (AdamW) weight decay (0.1; 0 = plain Adam)."),
]
ItersOpt = Annotated[int | None, typer.Option("--max-iters", help="Maximum training steps.")]
EvalEveryOpt = Annotated[
    int | None, typer.Option("--eval-every", help="Validate every N steps (default 200).")
]
PatienceOpt = Annotated[
    int | None, typer.Option("--patience", help="Validations without improvement before stopping.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Training seed.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
AmpOpt = Annotated[
    bool | None,
    typer.Option("--amp/--no-amp", help="bfloat16 autocast (the loss stays float32)."),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the training step (one-off compilation; a C++ compiler on CPU).",
    ),
]
# Export options
FactoryOpt = Annotated[
    str | None,
    typer.Option(
        "--index-factory",
        help="Faiss index factory: Flat (exact), HNSW32, IVF1024,PQ16; default: chosen by "
        "catalogue size, then tuned to --recall-target.",
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
    except (TypeError, ValueError) as exc:
        raise _fail(f"invalid {section} settings: {exc}") from None


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
        bool, typer.Option("--resume", help="Continue from --run-dir/last.pt.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a REMI model (ComiRec-SA + IHN + RR) and keep the best validation checkpoint."""
    settings = _read_config(config)
    if resume:
        if not (run_dir / "config.json").is_file():
            raise _fail(f"--resume: {run_dir} holds no run (config.json missing)")
        try:
            stored = json.loads((run_dir / "config.json").read_text())["train"]
            cfg = TrainConfig.from_dict(stored)
            if max_iters is not None:  # the one setting a resumed run may change: how far to go
                cfg = replace(cfg, max_iters=max_iters)
            dataset = SequenceDataset.load(run_dir / "dataset")
        except (ValueError, KeyError, DataError) as exc:
            raise _fail(f"--resume: cannot read the run in {run_dir}: {exc}") from None
    else:
        dataset = _dataset(
            dataset_dir, settings, source=data, format=format, user_col=user_col,
            item_col=item_col, time_col=time_col, min_count=min_count, split_seed=split_seed,
            synthetic_users=synthetic_users,
        )  # fmt: skip
        cfg = _settings(
            TrainConfig, settings, "train", model_type=model, dim=dim, num_interests=interests,
            seq_len=seq_len, beta=beta, rr_lambda=rr_lambda, routing_grad=routing_grad,
            num_negatives=negatives, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            max_iters=max_iters, eval_every=eval_every, patience=patience, seed=seed, device=device,
            amp=amp, compile=compile,
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
    try:
        if (path / "config.json").is_file():
            if dataset_dir is not None:
                raise _fail("--dataset-dir applies to bundles; a run is evaluated on its own data")
            model, dataset, cfg = load_run(path)
            eval_set = make_eval_set(dataset, dataset.users(split), cfg.seq_len)
            metrics = evaluate_model(model, eval_set)
        else:
            if dataset_dir is None:
                raise _fail("--dataset-dir is required to evaluate a bundle")
            bundle = load_bundle(path)
            dataset = SequenceDataset.load(dataset_dir)
            metrics = evaluate_bundle(bundle, dataset, split)
            eval_set = make_eval_set(dataset, dataset.users(split), bundle.config.seq_len)
    except (BundleError, DataError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    popular = evaluate_popularity(dataset.popularity(), eval_set)
    _echo_json({"split": split, "users": len(eval_set), "model": metrics, "most_popular": popular})


@app.command()
def export(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Training run to export.")],
    bundle_root: Annotated[Path, typer.Option("--bundle-root", help="Bundle root directory.")],
    config: ConfigOpt = None,
    index_factory: FactoryOpt = None,
    search_params: SearchParamsOpt = None,
    recall_target: Annotated[
        float | None,
        typer.Option(help="Recall@50 against exact Eq. 7 that tuning aims for (default 0.95)."),
    ] = None,
    publish: Annotated[bool, typer.Option(help="Point `current` at the new version.")] = True,
) -> None:
    """Write the run's best checkpoint as a new bundle version (and publish it)."""
    settings = _read_config(config).get("export", {})
    factory = index_factory or settings.get("index_factory")  # None: chosen by catalogue size
    params = search_params if search_params is not None else settings.get("search_params")
    target = recall_target if recall_target is not None else settings.get("recall_target", 0.95)
    if not (run_dir / "config.json").is_file():
        raise _fail(f"--run-dir: {run_dir} is not a training run (config.json missing)")
    try:
        path = export_run(run_dir, bundle_root, factory, params, publish, recall_target=target)
    except (ValueError, FileNotFoundError, BundleError, DataError) as exc:
        raise _fail(str(exc)) from None
    _echo_json({"bundle": str(path), "published": publish})


# --- nightly retraining, bootstrap and version management --------------------------------------

NightlyConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="REMI_TRAIN_CONFIG",
        help="Config file with data:, train:, export: and nightly: sections; flags override it.",
    ),
]
BundleRootOpt = Annotated[
    Path,
    typer.Option("--bundle-root", envvar="REMI_BUNDLE_ROOT", help="Bundle root holding `current`."),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="REMI_STATE_DIR",
        help="Accumulated events, run directories and reports (default: artifacts/nightly).",
    ),
]
RedisUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        envvar="REMI_REDIS_URL",
        help="Redis with the event stream and the lock (default redis://localhost:6379/0).",
    ),
]

LOCK_HELD_EXIT = 3


def _nightly_config(
    config: Path | None, bundle_root: Path, state_dir: Path | None, redis_url: str | None, **flags
) -> Any:
    """NightlyConfig from a config file's sections, overridden by the flags that were given."""
    from training.nightly import NightlyConfig, NightlyError

    settings = _read_config(config)
    nightly = dict(settings.get("nightly", {}))
    unknown = sorted(set(nightly) - NightlyConfig.scalar_fields())
    if unknown:
        raise _fail(f"--config: unknown nightly setting(s) {unknown}")
    export = settings.get("export", {})
    for key in ("index_factory", "search_params"):
        if key in export:
            nightly.setdefault(key, export[key])
    given = {"bundle_root": bundle_root, "state_dir": state_dir, "redis_url": redis_url, **flags}
    nightly.update({k: v for k, v in given.items() if v is not None})
    for key in ("bundle_root", "state_dir"):
        if key in nightly:
            nightly[key] = Path(nightly[key])
    try:
        return NightlyConfig(
            data=_settings(DataConfig, settings, "data"),
            train=_settings(TrainConfig, settings, "train", device=flags.get("device")),
            **{k: v for k, v in nightly.items() if k != "device"},
        )
    except (NightlyError, TypeError) as exc:
        raise _fail(f"--config: {exc}") from None


def _run_job(job: Any, cfg: Any) -> dict[str, Any]:
    """Run a nightly/bootstrap job, turning its expected failures into clear CLI errors."""
    from redis.exceptions import RedisError

    from training.nightly import LockHeld, NightlyError

    # SIGTERM (docker stop, a Kubernetes deadline) unwinds like Ctrl-C: the run writes its
    # failure report and releases the lock instead of leaving it until the TTL expires.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return job(cfg)
    except LockHeld as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=LOCK_HELD_EXIT) from None
    except (NightlyError, DataError, BundleError) as exc:
        raise _fail(str(exc)) from None
    except RedisError as exc:
        raise _fail(f"Redis at {cfg.redis_url} failed: {type(exc).__name__}: {exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def nightly(
    bundle_root: BundleRootOpt,
    config: NightlyConfigOpt = None,
    state_dir: StateDirOpt = None,
    redis_url: RedisUrlOpt = None,
    tolerance: Annotated[
        float | None,
        typer.Option(help="Publish when new >= current - tolerance on the metric (0.01)."),
    ] = None,
    retention: Annotated[
        int | None,
        typer.Option(
            help="Newest versions to keep; `current` is always kept too (default 5).", min=1
        ),
    ] = None,
    lock_ttl: Annotated[
        float | None,
        typer.Option("--lock-ttl", help="Lock expiry in seconds; a heartbeat extends it (300)."),
    ] = None,
    reload_url: Annotated[
        str | None,
        typer.Option(
            envvar="REMI_API_URL", help="Service URL to POST /admin/reload after publishing."
        ),
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar="REMI_ADMIN_TOKEN", help="Bearer token for the reload call."),
    ] = None,
    device: DeviceOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Retrain even if nothing changed since `current`.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the training progress bar.")] = False,
) -> None:
    """Fold new stream events into the data, retrain, and publish only if not worse.

    Exit codes: 0 the run completed (published, kept the current bundle, or had nothing to do;
    the JSON report says which and why), 2 bad settings or a failure, 3 another run holds the
    lock.
    """
    from training.nightly import run_nightly

    cfg = _nightly_config(
        config, bundle_root, state_dir, redis_url, tolerance=tolerance, retention=retention,
        lock_ttl_s=lock_ttl, reload_url=reload_url, admin_token=admin_token, device=device,
        force=force or None, progress=progress,
    )  # fmt: skip
    if cfg.redis_url is None:
        raise _fail("--redis-url: the nightly job needs Redis")
    report = _run_job(run_nightly, cfg)
    _echo_json(report)


@app.command()
def bootstrap(
    bundle_root: BundleRootOpt,
    config: NightlyConfigOpt = None,
    state_dir: StateDirOpt = None,
    redis_url: RedisUrlOpt = None,
    device: DeviceOpt = None,
    progress: Annotated[bool, typer.Option(help="Show the training progress bar.")] = False,
) -> None:
    """Train and publish the first bundle on the base data, unless one is already published.

    Safe to run on every start: with a `current` bundle it only says so. With --redis-url (or
    REMI_REDIS_URL) it takes the nightly lock, so it never races a nightly run.
    """
    from training.nightly import run_bootstrap

    cfg = _nightly_config(
        config, bundle_root, state_dir, redis_url, device=device, progress=progress
    )
    if redis_url is None:  # no Redis given: nothing to lock against (a plain local bootstrap)
        cfg = replace(cfg, redis_url=None)
    report = _run_job(run_bootstrap, cfg)
    _echo_json(report)


@app.command()
def versions(
    bundle_root: BundleRootOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List bundle versions, oldest first; `*` marks the one `current` points at."""
    from remi_core.bundle import current_version, list_versions, read_manifest

    current = current_version(bundle_root)
    rows = []
    for version in list_versions(bundle_root):
        try:
            manifest = read_manifest(bundle_root / version)
        except BundleError as exc:
            rows.append({"version": version, "current": version == current, "error": str(exc)})
            continue
        test = manifest.get("metrics", {}).get("test", {})
        rows.append(
            {
                "version": version,
                "current": version == current,
                "created_at": manifest.get("created_at"),
                "items": manifest.get("num_items", 1) - 1,
                "test_recall@50": test.get("recall@50"),
                "kind": manifest.get("nightly", {}).get("kind", "manual"),
            }
        )
    if as_json:
        _echo_json({"bundle_root": str(bundle_root), "current": current, "versions": rows})
        return
    if not rows:
        typer.echo(f"no versions in {bundle_root}")
        return
    for row in rows:
        mark = "*" if row["current"] else " "
        if "error" in row:
            typer.echo(f"{mark} {row['version']}  unreadable: {row['error']}")
            continue
        recall = row["test_recall@50"]
        recall_text = f"{recall:.4f}" if isinstance(recall, float) else "n/a"
        typer.echo(
            f"{mark} {row['version']}  created {row['created_at']}  items {row['items']}  "
            f"test recall@50 {recall_text}  ({row['kind']})"
        )


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="Version to make current (see `versions`).")],
    bundle_root: BundleRootOpt,
) -> None:
    """Point `current` at an earlier (or any existing) version; the service hot-reloads it.

    The next nightly run compares its model against this version, so it may publish again;
    stop the scheduler first to pin a version.
    """
    from remi_core.bundle import current_version, set_current

    previous = current_version(bundle_root)
    try:
        set_current(bundle_root, version)
    except BundleError as exc:
        raise _fail(f"{exc} (see `remi-train versions --bundle-root {bundle_root}`)") from None
    _echo_json({"bundle_root": str(bundle_root), "previous": previous, "current": version})


@app.command()
def report(
    out: Annotated[
        Path, typer.Option("--out", help="Where report.md, results.csv and figures go.")
    ],
    runs: Annotated[
        Path, typer.Option("--runs", help="Run cache; finished runs are reused.")
    ] = Path("runs/report"),
    data_root: Annotated[
        Path,
        typer.Option("--data-root", envvar="REMI_DATA_ROOT", help="Folder with the real datasets."),
    ] = Path("../shared/data"),
    datasets: Annotated[
        str, typer.Option(help="Comma-separated: beauty, sports.")
    ] = "beauty,sports",
    suites: Annotated[
        str, typer.Option(help="Comma-separated: table2, table5, sweeps, seeds, ablation.")
    ] = "table2,table5,sweeps,seeds,ablation",
    max_iters: ItersOpt = None,
    eval_every: EvalEveryOpt = None,
    patience: PatienceOpt = None,
    device: DeviceOpt = None,
    amp: AmpOpt = None,
    machine: Annotated[str, typer.Option(help="Machine description for the report.")] = "",
    only: Annotated[
        str | None, typer.Option(help="Run only rows whose label matches this glob.")
    ] = None,
    train_missing: Annotated[
        bool, typer.Option(help="Train missing runs (--no-train-missing: report finished ones).")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option(help="List the experiments, whether each has run, and stop.")
    ] = False,
) -> None:
    """Regenerate the results report (tables, CSV, figures) on the real datasets."""
    from training.experiments import plan, run_all, run_status, write_report

    if not data_root.is_dir():
        raise _fail(f"--data-root: {data_root} does not exist")
    overrides = {"max_iters": max_iters, "eval_every": eval_every, "patience": patience,
                 "device": device, "amp": amp}  # fmt: skip
    base = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    try:
        experiments = plan(datasets.split(","), suites.split(","), base)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if only:
        experiments = [e for e in experiments if fnmatch.fnmatch(e.label, only)]
    unique = {(e.dataset, e.key) for e in experiments}
    typer.echo(f"{len(experiments)} report rows, {len(unique)} distinct runs", err=True)
    if dry_run:
        for e in experiments:
            typer.echo(f"{e.dataset}\t{e.label}\t{run_status(e, runs)}")
        return
    try:
        rows = run_all(experiments, data_root, runs, train_missing=train_missing)
    except (ValueError, DataError) as exc:
        raise _fail(str(exc)) from None
    if not rows:
        raise _fail("no finished runs to report")
    path = write_report(rows, out, machine or _machine())
    typer.echo(f"report: {path}")


def _machine() -> str:
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({os.cpu_count()} cores, {cpu}), torch {torch.__version__}"


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
