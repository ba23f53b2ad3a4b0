"""Service configuration: environment variables ``EMBSERVE_*`` (pydantic-settings), overridable
by CLI flags.  The README's configuration table lists every field."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
