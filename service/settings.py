"""Service configuration: environment variables ``EMBSERVE_*`` (pydantic-settings), overridable
by CLI flags.  The README's configuration table lists every field."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBSERVE_", extra="ignore")

    tables_dir: Path = Field(Path("tables"), description="folder of *.safetensors table files loaded at start")
    device: str = Field("cpu", description="torch device tables are served from: cpu, cuda, cuda:1, ...")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="port to bind (0 = any free port)")
    max_ids_per_request: int = Field(1_000_000, ge=1, description="IDs over all lookups of one request")
    max_lookups_per_request: int = Field(64, ge=1, description="table lookups in one request")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body size limit")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for torch and the decoder")
    log_level: str = Field("info", description="uvicorn log level")

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
    snapshot_interval_s: float = Field(300.0, gt=0, description="snapshot changed tables this often")
    segment_updates: int = Field(100_000, ge=1, description="re-decide classes after this many updated rows")
    segment_seconds: float = Field(60.0, gt=0, description="... or after this many seconds with updates")
    sketch_width: int = Field(1 << 20, ge=256, description="count-min sketch width per table (4 rows of float32)")
    frequency_half_life_s: float = Field(3600.0, gt=0, description="half-life of the decayed ID frequencies")
    admin_token: str | None = Field(None, description="bearer token for admin endpoints; unset = admin open (development)")

    def sqlite_path(self) -> Path:
        return self.log_path if self.log_path is not None else self.tables_dir / "updates.sqlite3"
