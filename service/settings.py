"""Service settings, read from REMI_* environment variables (or passed to create_app)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from remi_core.threads import MAX_THREADS
from service.redact import redact_url

ExactSearch = Literal["auto", "screened-int8", "screened", "dense", "faiss"]
"""REMI_EXACT_SEARCH's choices (service.recommender.EXACT_SEARCH lists them for code)."""

MIN_RELOAD_INTERVAL_S = 0.01
"""The shortest REMI_RELOAD_INTERVAL_S but 0 (off)."""
# Clients send keys and tokens in HTTP headers, which servers read as latin-1: a key with other
# characters (UTF-8 "é" arrives as "Ã©") could never match, so such a key is refused at start.
HEADER_SAFE = "must be printable ASCII (HTTP headers carry nothing else reliably)"


def _header_safe(value: str) -> bool:
    return all(" " <= char <= "~" for char in value)


class Settings(BaseSettings):
    """Everything the service reads from its environment.

    Each field maps to the environment variable REMI_<FIELD NAME IN UPPER CASE>, e.g.
    `bundle_root` <- REMI_BUNDLE_ROOT. Values passed to the constructor win over the environment.
    """

    # hide_input_in_errors: a rejected value is never echoed, since it may hold a password (the
    # Redis URL) or a key; the validators' messages show what can be shown.
    # allow_inf_nan=False: NaN fails every bound, and was refused as "less than or equal to 60".
    model_config = SettingsConfigDict(
        env_prefix="REMI_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        allow_inf_nan=False,
    )

    bundle_root: Path = Field(
        Path("artifacts/bundles"),
        description="Bundle root directory; the service serves the version its `current` "
        "symlink points at.",
    )
    device: str = Field(
        "cpu",
        description="Torch device for the user encoder (cpu, cuda, cuda:1, ...); a device this "
        "host lacks stops remi-serve at start with one line. On a CUDA device the search runs "
        "there too, exact for every bundle (REMI_EXACT_SEARCH). Otherwise the Faiss index "
        "goes to the GPU on its own when the installed faiss has GPU support and a GPU is "
        "present.",
    )
    verify_checksums: bool = Field(
        True, description="Check every bundle file against the manifest's sha256 when loading."
    )
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis holding user histories and the event stream (redis://, rediss:// or "
        "unix://). Checked at start: a database that is no whole number, or a query option the "
        "connection does not take, stops remi-serve with one line.",
    )
    redis_timeout_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Connect and socket timeout for Redis, in seconds. Short, so a dead Redis "
        "yields a fast 503 instead of hanging requests. One budget for all of a request's "
        "round trips: waiting for a pooled connection, and reading a whole batch's histories.",
    )
    redis_max_connections: int = Field(
        100,
        ge=1,
        description="Connections to Redis per worker. A request that finds them all busy waits "
        "for one within REMI_REDIS_TIMEOUT_S instead of failing.",
    )
    history_cap: int = Field(
        200,
        ge=1,
        le=1_000_000,
        description="Items kept per user in remi:history:<user_id> (the oldest by timestamp are "
        "trimmed).",
    )
    stream_maxlen: int | None = Field(
        None,
        ge=1,
        le=2**63 - 1,  # Redis's limit: a larger one would fail every POST /events
        description="Approximate cap on the remi:events stream; unset keeps every event until "
        "the nightly job trims it (it must see everything since its last run).",
    )
    # The request limits stop at a million: far past any catalogue a request can page through,
    # and short of the sizes that overflow torch's and Redis's 64-bit arguments (a 500 or a 503
    # on every request instead of a refusal at start-up).
    max_events: int = Field(
        1000, ge=1, le=1_000_000, description="Most events accepted by one POST /events."
    )
    max_n: int = Field(
        1000, ge=1, le=1_000_000, description="Largest `n` a recommend request may ask for."
    )
    max_history: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Longest `history` a recommend request may send, and the most items read "
        "from a stored history.",
    )
    coverage_window_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Window of the catalogue-coverage metric: distinct items served per this "
        "many seconds.",
    )
    max_batch: int = Field(
        256, ge=1, le=1_000_000, description="Most entries in one POST /recommend/batch request."
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, in bytes; bigger ones get 413 before being "
        "read in full. The default (16 MiB) fits a full batch (REMI_MAX_BATCH entries of "
        "REMI_MAX_HISTORY ids) with ids of up to about 60 characters.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest wait for more of a request body, in seconds (from the headers, "
        "then from each part received); a client that sent nothing for that long gets 408 and "
        "its connection is closed, so stalled clients cannot hold connections (and file "
        "descriptors) for good. A slow upload that keeps sending is not cut off.",
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
    batch_balance_ms: float = Field(
        2.0,
        ge=0,
        le=100,
        description="Micro-batching: when a compute thread frees up with fewer requests "
        "queued than half of the last batch's plus the queue's, the longest it waits (ms, from "
        "that moment) for more, so that clients answered together do not split into a tiny "
        "batch and a big one. Never delays a request at concurrency 1. 0 turns it off.",
    )
    batch_max_users: int = Field(
        128,
        ge=1,
        description="Micro-batching: most users gathered into one encode and search. 1 turns "
        "cross-request batching off. A request with more users (a /recommend/batch of up to "
        "REMI_MAX_BATCH entries) is never split; it runs as a batch of its own.",
    )
    batch_inline_ms: float = Field(
        10.0,
        ge=0,
        le=15,
        description="Micro-batching on a worker with one CPU (remi-serve --workers as many as the "
        "cores, or a one-CPU container): the longest a batch of plain requests (n <= 100, no "
        "explain, no diversity) may be expected to take, in ms, for the event loop to compute "
        "it itself instead of handing it to the compute thread, which on one CPU only adds a "
        "thread hand-off. The loop is blocked that long at most, so keep it well under "
        "/healthz's budget. 0 always hands batches to the thread. Ignored with more CPUs.",
    )
    compute_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="Threads that run batches (encode, search, response rendering) side by "
        "side, each with REMI_TORCH_THREADS torch threads. 0 chooses per bundle: for torch's "
        "exact search on the CPU, as many as fit in the worker's share of the CPUs "
        "(REMI_THREADS / REMI_TORCH_THREADS); for an index search (faiss spreads a batch over the "
        "cores itself) or a GPU, one batch at a time. GET /v1/model shows it as batches_at_once; "
        "see docs/serving.md.",
    )
    fast_lane: bool = Field(
        True,
        description="Answer plain POST /recommend requests (a small valid JSON body with a "
        "history, or a user_id and a good API key) without FastAPI's routing and dependencies: "
        "the same answers for about half the event loop's time per request. Everything else "
        "goes to the FastAPI route as before. See docs/serving.md.",
    )
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval) in ms: how long the "
        "event loop may wait for the GIL while a compute thread runs Python. Python's default "
        "is 5 ms.",
    )
    exact_search: ExactSearch = Field(
        "auto",
        description="How bundles with an exact (Flat) index are searched: 'dense' (Eq. 7 as "
        "blocked float32 matmuls in torch), 'screened-int8' or 'screened' (the same on the CPU "
        "in int8 or bfloat16, the rows that could make the top n under the rounding's bound "
        "rescored in float32: the same answers, faster on CPUs with int8 or bfloat16 dot "
        "products), 'faiss' (the bundle's IndexFlatIP), or 'auto': the fastest of the torch "
        "three on this host, timed when a bundle loads. With REMI_DEVICE on a CUDA device, "
        "'dense' and 'auto' run the dense search on that GPU for every bundle, an approximate "
        "(IVF, HNSW) one too: its answers are then exact, and 'faiss' keeps its index. "
        "GET /v1/model shows the choice "
        "as search_backend and search_device; see docs/benchmarks.md.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for POST /admin/reload; unset disables the admin endpoints.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys for the data routes (POST /events, and "
        "/recommend and /recommend/batch when they read a stored history by user_id), sent in "
        "the X-API-Key header. Unset (and no REMI_API_KEYS_FILE): those routes are open.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File with one API key per line (blank lines and # comments skipped), "
        "e.g. a Docker secret; its keys are accepted together with REMI_API_KEYS.",
    )
    graceful_shutdown_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="On SIGTERM, how long a worker waits for open requests and connections "
        "(a client still sending its body, say) before closing them and shutting down, in "
        "seconds. Below Docker's 10 s before SIGKILL, so the shutdown always completes.",
    )
    reload_interval_s: float = Field(
        0.5,
        ge=0,
        le=86_400,
        description="How often each worker checks whether `current` points at a new bundle, in "
        "seconds (one readlink; the bundle is loaded only when it moved), so every worker serves "
        "a publish or an /admin/reload within about this long plus the load time. 0 turns "
        "polling off: then POST /admin/reload reloads only the worker that answers it; else at "
        f"least {MIN_RELOAD_INTERVAL_S} (a shorter one spins a core on readlink).",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        le=MAX_THREADS,
        description="Threads of torch (the encoder and exact search) in each compute thread; 0 "
        "uses REMI_THREADS (the worker's share of the CPUs). 1 leaves the other core of a small "
        "host to the event loop. Faiss's index search in a compute thread uses REMI_THREADS; "
        "see docs/serving.md.",
    )

    @field_validator("stream_maxlen", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `REMI_STREAM_MAXLEN=` (compose's `${VAR:-}`) means unset, its documented default.
        return None if value == "" else value

    @field_validator("bundle_root", "api_keys_file", mode="before")
    @classmethod
    def _path_not_empty(cls, value: object) -> object:
        # An empty path is the working directory: a confusing "Is a directory: '.'" for the keys
        # file, the bundles looked for wherever the server was started.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a path, not an empty string (unset it for the default)")
        return value

    @field_validator("admin_token")
    @classmethod
    def _admin_token_without_blanks(cls, token: SecretStr | None) -> SecretStr | None:
        # Blanks around a header value are not part of it (require_admin strips them), so a
        # token kept with them, a secret file's newline say, could never match.
        return None if token is None else SecretStr(token.get_secret_value().strip())

    @field_validator("reload_interval_s")
    @classmethod
    def _reload_interval_off_or_sane(cls, value: float) -> float:
        if 0 < value < MIN_RELOAD_INTERVAL_S:
            raise ValueError(f"must be 0 (off) or at least {MIN_RELOAD_INTERVAL_S} seconds")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, url: str) -> str:
        # Checked here so a typo fails at start-up with this message, not deep inside redis-py.
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"must start with redis://, rediss:// or unix://, not {redact_url(url)}"
            )
        # Parsed as the workers' connection pool will, so that remi-serve refuses it with this
        # line instead of every worker failing its start-up.
        from service.history import check_redis_url

        check_redis_url(url)
        return url

    @field_validator("device")
    @classmethod
    def _device_usable(cls, value: str) -> str:
        # Checked here, so that `remi-serve --check` (which loads on the CPU) and every worker
        # fail on the setting, not as a bundle that "cannot load".
        import torch

        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{value!r}: the service runs on cpu or cuda[:N]")
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ValueError(f"{value!r}: this host has {count} CUDA device(s)")
        return value

    @model_validator(mode="after")
    def _admin_token_not_blank(self) -> Settings:
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value()
            if not token:
                raise ValueError(
                    "REMI_ADMIN_TOKEN must not be blank; leave it unset to disable admin"
                )
            if not _header_safe(token):
                raise ValueError(f"REMI_ADMIN_TOKEN {HEADER_SAFE}")
        return self

    @model_validator(mode="after")
    def _api_keys_readable(self) -> Settings:
        try:
            keys = self.api_key_list()  # reads the keys file, once
        except OSError as exc:
            raise ValueError(f"REMI_API_KEYS_FILE cannot be read: {exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"REMI_API_KEYS_FILE {self.api_keys_file}: not UTF-8 text") from None
        sources = {"REMI_API_KEYS": self.api_keys, "REMI_API_KEYS_FILE": self.api_keys_file}
        given = [name for name, value in sources.items() if value is not None]
        if given and not keys:
            # Fails closed: a keys file emptied by a rotation, or a secret mounted empty, must
            # not open the data routes.
            one = len(given) == 1
            raise ValueError(
                f"{' and '.join(given)} {'holds' if one else 'hold'} no key; leave "
                f"{'it' if one else 'them'} unset to keep the data routes open"
            )
        if not all(_header_safe(key) for key in keys):
            raise ValueError(f"every API key (REMI_API_KEYS, REMI_API_KEYS_FILE) {HEADER_SAFE}")
        return self

    def api_key_list(self) -> list[str]:
        """Every configured API key (empty: the data routes are open)."""
        keys = []
        if self.api_keys is not None:
            keys += self.api_keys.get_secret_value().split(",")
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            keys += [line for line in lines if not line.lstrip().startswith("#")]
        return [key.strip() for key in keys if key.strip()]


def describe_error(exc: ValidationError) -> str:
    """A settings error as one line per problem, each naming its environment variable
    (pydantic names the field: `max_n`, where the operator set REMI_MAX_N)."""
    lines = []
    for error in exc.errors():
        field = "_".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        # Checks of several settings together name theirs in the message.
        lines.append(f"REMI_{field.upper()}: {message}" if field else message)
    return "\n".join(lines)
