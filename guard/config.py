"""Serving settings: flags override environment variables (GUARD_*), which override an optional settings file (JSON
or TOML), which overrides the defaults here.

Defaults are safe for a sidecar: both ports listen on loopback unless told otherwise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from guard.errors import GuardError
from guard.runtime.policy import FailurePolicy, Policy

DEFAULT_PORT = 8001
DEFAULT_METRICS_PORT = 8002


class ServeSettings(BaseSettings):
    """Everything `guard serve` needs; each field can be set as GUARD_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="GUARD_", extra="forbid")

    model: Path = Field(description="the ONNX model to serve")
    profile: Path = Field(description="the profile `guard calibrate` wrote for this model")
    model_name: str | None = Field(None, description="name clients use; defaults to the model file's stem")
    host: str = Field("127.0.0.1", description="interface for gRPC (0.0.0.0 to accept other hosts)")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_host: str = Field("127.0.0.1", description="interface for the Prometheus metrics endpoint")
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, description="metrics HTTP port (0: free one)")
    device: str = Field("cpu", pattern="^(cpu|cuda)$", description="where the model runs")
    policy: Policy = Field(Policy.ENFORCE, description="monitor: flag only; enforce: answer benign re-predictions")
    max_batch: int = Field(1024, ge=1, description="most samples one request may carry")
    max_message_mb: int = Field(64, ge=1, le=2047, description="largest gRPC message accepted, in MiB (gRPC's "
                                                                "limit is a 32-bit byte count)")
    workers: int = Field(8, ge=1, description="inference requests the engine works on at once")
    max_inflight: int = Field(64, ge=1, description="inference requests held at once, running or waiting for one "
                                                    "of the workers; more are refused at once (RESOURCE_EXHAUSTED)")
    threads: int = Field(0, ge=0, description="the engine's intra-op threads per run (0: one per core)")
    batch_size: int = Field(0, ge=0, description="dynamic batching: join concurrent requests into engine runs of up "
                                                 "to this many samples (0: off, each request runs alone)")
    batch_delay_ms: float = Field(2.0, ge=0, description="dynamic batching: longest a request waits for others")
    engine: str = Field("onnxruntime", pattern="^(onnxruntime|torch)$",
                        description="onnxruntime, or torch (the same graphs through guard's torch bridge)")
    grace_seconds: float = Field(30.0, ge=0, description="how long SIGTERM waits for in-flight requests")
    on_check_failure: FailurePolicy = Field(FailurePolicy.CLOSED, description="closed: refuse a request the guard "
                                            "could not check (UNAVAILABLE); open: answer it unguarded, marked")
    check_budget_ms: float = Field(0.0, ge=0, description="the guarded run may take this long before it counts as "
                                                           "a failed check (0: no limit)")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve gRPC over TLS (with tls_key)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA: require client certificates it signed (mutual TLS)")
    auth_token_file: Path | None = Field(None, description="file holding a bearer token every call but health "
                                                           "checks must send (authorization: Bearer <token>)")
    audit_log: str | None = Field(None, description="append a JSON line per request with a flagged sample (or "
                                                    "answered unguarded), naming the caller, to this file; - for stdout")
    reflection: bool = Field(False, description="serve gRPC reflection, so grpcurl can list and describe the "
                                                "services (off: it tells any caller the API's shape)")

    @field_validator("model", "profile", "tls_cert", "tls_key", "tls_client_ca", "auth_token_file")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _tls_complete(self) -> ServeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.stem


def load_settings(flags: dict[str, Any], config: Path | None = None) -> ServeSettings:
    """The settings from `flags` (the ones given), then GUARD_* variables, then the settings file (`config`, else
    $GUARD_CONFIG), then the defaults. Raises pydantic's ValidationError for a bad value, and a GuardError for a file
    that cannot be read or names a setting that does not exist."""
    from_file = file_settings(config)
    in_env = {name.upper() for name in os.environ}  # pydantic-settings matches the variables' names in any case
    kept = {k: v for k, v in from_file.items() if f"GUARD_{k.upper()}" not in in_env}
    return ServeSettings(**{**kept, **flags})


def file_settings(config: Path | None = None) -> dict[str, Any]:
    """The settings file's values: `config`, else $GUARD_CONFIG's file, else none."""
    path = config or (Path(os.environ["GUARD_CONFIG"]) if os.environ.get("GUARD_CONFIG") else None)
    return {} if path is None else read_settings_file(path)


def read_settings_file(path: Path) -> dict[str, Any]:
    """A JSON object or TOML table of settings, keyed by their names (`max_batch`, or `max-batch` as the flag)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GuardError(f"cannot read the settings file {path}: {exc}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            if sys.version_info < (3, 11):
                raise GuardError("TOML settings files need Python 3.11 or later; use JSON")
            import tomllib

            values = tomllib.loads(text)
        else:
            raise GuardError(f"the settings file must be .json or .toml, got {path.name}")
    except (ValueError, RecursionError) as exc:  # json and tomllib decode errors are ValueErrors
        raise GuardError(f"the settings file {path} is malformed: {exc}") from None
    if not isinstance(values, dict):
        raise GuardError(f"the settings file {path} must hold one object of settings, got {type(values).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(ServeSettings.model_fields))
    if unknown:
        raise GuardError(f"the settings file {path} names unknown settings {unknown}; `guard serve --help` lists them")
    return values
