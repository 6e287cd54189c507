"""Commands for the retraining loop: the nightly job and the first bundle (bootstrap)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from remi_core.threads import lower_priority
from training.commands.options import (
    CliError,
    DeviceOpt,
    checked,
    echo_json,
    read_config,
    setting,
    settings,
)
from training.config import TrainConfig
from training.data import DataConfig
from training.export import ExportConfig
from training.nightly.config import NightlyConfig, NightlyError
from training.nightly.job import run_bootstrap, run_nightly

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
    Path, setting(NightlyConfig, "bundle_root", envvar="REMI_BUNDLE_ROOT", show_default=False)
]
StateDirOpt = Annotated[Path | None, setting(NightlyConfig, "state_dir", envvar="REMI_STATE_DIR")]
RedisUrlOpt = Annotated[str | None, setting(NightlyConfig, "redis_url", envvar="REMI_REDIS_URL")]
# None when not given: a config file's `progress: true` stands (a False default overrode it).
ProgressOpt = Annotated[bool | None, setting(NightlyConfig, "progress", "--progress/--no-progress")]


# Nightly settings whose flag is not the setting's name in kebab case.
_FLAGS = {"lock_ttl_s": "--lock-ttl"}


def nightly_config(
    config: Path | None,
    bundle_root: Path,
    state_dir: Path | None,
    redis_url: str | None,
    redis_default: str | None = NightlyConfig.redis_url,
    **flags,
) -> NightlyConfig:
    """NightlyConfig from a config file's sections, overridden by the flags that were given;
    `redis_default` where neither names Redis."""
    file = read_config(config)
    nightly = dict(file.get("nightly", {}))
    unknown = sorted(set(nightly) - NightlyConfig.scalar_fields())
    if unknown:
        raise CliError(f"--config: unknown nightly setting(s) {unknown}")
    nightly.setdefault("redis_url", redis_default)
    # Published bundles' index as the export: section says, unless nightly: says otherwise.
    for key, value in checked(ExportConfig, file.get("export", {}), "export").items():
        nightly.setdefault(key, value)
    given = {"bundle_root": bundle_root, "state_dir": state_dir, "redis_url": redis_url, **flags}
    nightly.update({k: v for k, v in given.items() if v is not None})
    device = nightly.pop("device", None)
    nightly = checked(NightlyConfig, nightly, "nightly")
    for key in ("bundle_root", "state_dir"):
        if key in nightly:
            nightly[key] = Path(nightly[key])
    try:
        return NightlyConfig(
            data=settings(DataConfig, file, "data"),
            train=settings(TrainConfig, file, "train", device=device),
            **nightly,
        )
    except (NightlyError, TypeError) as exc:
        # A value from a flag is named as the flag (--tolerance -1 was blamed on --config).
        message = str(exc)
        flag = next(
            (_FLAGS.get(k, "--" + k.replace("_", "-")) for k, v in given.items()
             if v is not None and message.startswith(k)),
            "--config",
        )  # fmt: skip
        raise CliError(f"{flag}: {message}") from None


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (docker stop, a Kubernetes deadline) unwinds like Ctrl-C: the run writes its
    failure report and releases the lock instead of leaving it until the TTL expires."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def nightly(
    bundle_root: BundleRootOpt,
    config: NightlyConfigOpt = None,
    state_dir: StateDirOpt = None,
    redis_url: RedisUrlOpt = None,
    tolerance: Annotated[float | None, setting(NightlyConfig, "tolerance")] = None,
    retention: Annotated[int | None, setting(NightlyConfig, "retention", min=1)] = None,
    lock_ttl: Annotated[float | None, setting(NightlyConfig, "lock_ttl_s", "--lock-ttl")] = None,
    reload_url: Annotated[
        str | None, setting(NightlyConfig, "reload_url", envvar="REMI_API_URL")
    ] = None,
    admin_token: Annotated[
        str | None, setting(NightlyConfig, "admin_token", envvar="REMI_ADMIN_TOKEN")
    ] = None,
    device: DeviceOpt = None,
    force: Annotated[bool, setting(NightlyConfig, "force", "--force")] = False,
    progress: ProgressOpt = None,
) -> None:
    """Fold new stream events into the data, retrain, and publish only if not worse.

    Exit codes: 0 the run completed (published, kept the current bundle, or had nothing to do;
    the JSON report says which and why), 2 bad settings or a failure, 3 another run holds the
    lock, 143 stopped by SIGTERM (a `failed` report written, the lock released).
    """
    cfg = nightly_config(
        config, bundle_root, state_dir, redis_url, tolerance=tolerance, retention=retention,
        lock_ttl_s=lock_ttl, reload_url=reload_url, admin_token=admin_token, device=device,
        force=force or None, progress=progress,
    )  # fmt: skip
    if cfg.redis_url is None:
        raise CliError("--redis-url: the nightly job needs Redis")
    lower_priority(cfg.nice)
    with sigterm_unwinds():
        run_nightly(cfg, emit=echo_json)  # a failed run's report too, before its error


def bootstrap(
    bundle_root: BundleRootOpt,
    config: NightlyConfigOpt = None,
    state_dir: StateDirOpt = None,
    redis_url: RedisUrlOpt = None,
    device: DeviceOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Train and publish the first bundle on the base data, unless one is already published.

    Safe to run on every start: with a `current` bundle it only says so. With --redis-url (or
    REMI_REDIS_URL, or the config file's nightly: redis_url) it takes the nightly lock, so it
    never races a nightly run.
    """
    # No Redis given: nothing to lock against (a plain local bootstrap).
    cfg = nightly_config(config, bundle_root, state_dir, redis_url, redis_default=None,
                         device=device, progress=progress)  # fmt: skip
    lower_priority(cfg.nice)
    with sigterm_unwinds():
        run_bootstrap(cfg, emit=echo_json)
