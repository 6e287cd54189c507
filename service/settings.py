"""Service settings, read from REMI_* environment variables (or passed to create_app)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service reads from its environment.

    Each field maps to the environment variable REMI_<FIELD NAME IN UPPER CASE>, e.g.
    `bundle_root` <- REMI_BUNDLE_ROOT. Values passed to the constructor win over the environment.
    """

    model_config = SettingsConfigDict(env_prefix="REMI_", extra="ignore", frozen=True)

    bundle_root: Path = Field(
        Path("artifacts/bundles"),
        description="Bundle root directory; the service serves the version its `current` "
        "symlink points at.",
    )
    device: str = Field(
        "cpu",
        description="Torch device for the user encoder (e.g. cpu, cuda). The Faiss index goes "
        "to the GPU on its own when the installed faiss has GPU support and a GPU is present.",
    )
    verify_checksums: bool = Field(
        True, description="Check every bundle file against the manifest's sha256 when loading."
    )
    redis_url: str = Field(
        "redis://localhost:6379/0", description="Redis holding user histories and the event stream."
    )
    redis_timeout_s: float = Field(
        0.5,
        gt=0,
        description="Connect and socket timeout for Redis, in seconds. Short, so a dead Redis "
        "yields a fast 503 instead of hanging requests.",
    )
    history_cap: int = Field(
        200, ge=1, description="Items kept per user in remi:history:<user_id> (oldest trimmed)."
    )
    stream_maxlen: int | None = Field(
        None,
        ge=1,
        description="Approximate cap on the remi:events stream; unset keeps every event until "
        "the nightly job trims it (it must see everything since its last run).",
    )
    max_events: int = Field(1000, ge=1, description="Most events accepted by one POST /events.")
    max_n: int = Field(1000, ge=1, description="Largest `n` a recommend request may ask for.")
    max_history: int = Field(
        1000,
        ge=1,
        description="Longest `history` a recommend request may send, and the most items read "
        "from a stored history.",
    )
    max_batch: int = Field(
        256, ge=1, description="Most entries in one POST /recommend/batch request."
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Micro-batching: longest a recommend request waits for others to share its "
        "encode and search, in ms, counted from its arrival. While a batch computes, new requests "
        "queue and join the next batch anyway; 0 batches only what is queued and adds no latency "
        "at low load (a wait brought nothing measurable in bench/bench_serve_load.py).",
    )
    batch_max_users: int = Field(
        128,
        ge=1,
        description="Micro-batching: most users gathered into one encode and search. 1 turns "
        "cross-request batching off. A request with more users (a /recommend/batch of up to "
        "REMI_MAX_BATCH entries) is never split; it runs as a batch of its own.",
    )
    compute_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads that run batches (encode, search, response rendering). 1 runs one "
        "batch at a time; more run batches side by side, each with REMI_TORCH_THREADS threads.",
    )
    gil_switch_interval_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval) in ms: how long the "
        "event loop may wait for the GIL while the compute thread runs Python. Python's default "
        "is 5 ms.",
    )
    exact_search: Literal["dense", "faiss"] = Field(
        "dense",
        description="How bundles with an exact (Flat) index are searched on the CPU: 'dense' "
        "(Eq. 7 as blocked matmuls in torch, about 2x faster on 2 cores, see "
        "docs/benchmarks.md) or 'faiss' (the bundle's IndexFlatIP).",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for POST /admin/reload; unset disables the admin endpoints.",
    )
    reload_interval_s: float = Field(
        30.0,
        ge=0,
        description="How often to check whether `current` points at a new bundle, in seconds; "
        "0 turns polling off (POST /admin/reload still works).",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="Intra-op threads for torch; 0 keeps torch's default. Requests already run "
        "in parallel threads, and torch's and faiss's OpenMP pools fight over the cores when "
        "both are wide (bench/bench_service.py: batch-1 latency several times worse).",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, url: str) -> str:
        # Checked here so a typo fails at start-up with this message, not deep inside redis-py.
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @model_validator(mode="after")
    def _admin_token_not_blank(self) -> Settings:
        if self.admin_token is not None and not self.admin_token.get_secret_value().strip():
            raise ValueError("admin_token must not be blank; leave it unset to disable admin")
        return self
