"""Service configuration: environment variables ``EMBSERVE_*`` (pydantic-settings), overridable
by CLI flags.  The README's configuration table lists every field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBSERVE_", extra="ignore", populate_by_name=True)

    tables_dir: Path = Field(Path("tables"), description="folder of *.safetensors table files loaded at start; snapshots go here")
    seed_dir: Path | None = Field(
        None, description="read-only folder of base tables: one missing from tables_dir is copied from here at start (replicas)"
    )
    device: str = Field("cpu", description="torch device tables are served from: cpu, cuda, cuda:1, ...")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="port to bind (0 = any free port)")
    max_ids_per_request: int = Field(1_000_000, ge=1, description="IDs over all lookups of one request")
    max_lookups_per_request: int = Field(64, ge=1, description="table lookups in one request")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body size limit")
    max_response_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="estimated response size limit (rows x dim x bytes a value: 4 binary, ~13 JSON); 413 above"
    )
    inline_max_body_bytes: int = Field(
        16 * 1024, ge=0, description="lookup bodies up to this size are served on the event loop, larger ones in the thread pool"
    )
    torch_threads: int = Field(
        1, ge=1, description="intra-op threads for torch and the decoder; 1 = concurrency across requests, not inside one"
    )
    log_level: str = Field("info", description="HTTP server log level")
    http_server: Literal["uvicorn", "granian"] = Field(
        "uvicorn", description="HTTP server the service runs under (service/serving.py; the faster one measured is the default)"
    )
    http_fast_path: bool = Field(
        True, description="uvicorn: answer small POST /v1/lookup requests in the HTTP protocol, below ASGI (service/fasthttp.py); false = all through ASGI"
    )
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="port of the KServe v2 gRPC endpoint, in the same process (unset = no gRPC)"
    )
    batch_window_us: int | None = Field(
        None, ge=0, le=1_000_000,
        description="merge concurrent lookups of a table arriving within this many microseconds into one decode; 0 = off; unset = 0 on CPU, 200 on a GPU",
    )
    max_batch_ids: int = Field(65_536, ge=1, description="IDs in one merged decode, at most (a larger request is decoded alone)")

    # streaming updates
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("EMBSERVE_REDIS_URL", "REDIS_URL"),
        description="Redis URL of the update stream; unset = embedded SQLite log",
    )
    redis_stream: str = Field("embserve:updates", description="Redis stream key of the update log")
    log_path: Path | None = Field(None, description="SQLite update log file (default: <tables_dir>/updates.sqlite3)")
    max_updates_per_request: int = Field(100_000, ge=1, description="upserted + deleted IDs in one update request")
    wait_timeout_s: float = Field(10.0, gt=0, description="longest an update request with wait=true waits to be applied")
    max_apply_lag_s: float = Field(
        60.0, ge=0, description="refuse updates (503 apply_lag, Retry-After) while the oldest logged but unapplied update is"
        " older than this: writers slow to what the applier keeps up with; 0 = never refuse",
    )
    trim_log: bool = Field(
        True, description="drop log entries behind the snapshots (Redis: behind the oldest snapshot over live replicas)"
    )
    replica_id: str | None = Field(None, description="this replica's name in the shared stream's trim records (default host:port)")
    replica_ttl_s: float = Field(
        600.0, gt=0, description="a replica silent this long stops holding the shared stream's trimming back"
    )
    snapshot_interval_s: float = Field(300.0, gt=0, description="snapshot changed tables this often")
    segment_updates: int = Field(100_000, ge=1, description="re-decide classes after this many updated rows")
    segment_seconds: float = Field(60.0, gt=0, description="... or after this many seconds with updates")
    redecide_max_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="at most this share of the applier's time goes to segment re-decisions: after one that took t seconds, "
        "the next waits t * (1 / share - 1) (a re-decision of an over-budget table does not wait); 1 = no pacing",
    )
    sketch_width: int = Field(1 << 20, ge=256, description="count-min sketch width per table (4 rows of float32)")
    frequency_half_life_s: float = Field(3600.0, gt=0, description="half-life of the decayed ID frequencies")
    # access control (service/security.py)
    token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("EMBSERVE_TOKEN", "EMBSERVE_ADMIN_TOKEN"),
        description="bearer token every write and admin request must carry; unset = only loopback clients may write",
    )
    token_file: Path | None = Field(None, description="file holding the write token (a mounted secret); wins over EMBSERVE_TOKEN")
    read_token: SecretStr | None = Field(None, description="bearer token reads must carry (the write token works too); unset = reads open")
    read_token_file: Path | None = Field(None, description="file holding the read token")

    @model_validator(mode="after")
    def _tokens_from_files(self) -> "Settings":
        """Secrets mounted as files (Docker/Kubernetes secrets) are read once, at start-up."""
        for field, file_field in (("token", "token_file"), ("read_token", "read_token_file")):
            path: Path | None = getattr(self, file_field)
            if path is None:
                continue
            try:
                text = path.read_text().strip()
            except OSError as exc:
                raise ValueError(f"{file_field}: cannot read {path}: {exc.strerror}") from None
            if not text:
                raise ValueError(f"{file_field}: {path} is empty")
            setattr(self, field, SecretStr(text))
        for field in ("token", "read_token"):
            value: SecretStr | None = getattr(self, field)
            if value is not None and len(value.get_secret_value()) < 16:
                raise ValueError(f"{field}: use at least 16 characters")
        return self

    def sqlite_path(self) -> Path:
        return self.log_path if self.log_path is not None else self.tables_dir / "updates.sqlite3"
