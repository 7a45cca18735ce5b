"""Serving settings: flags override environment variables (GUARD_*), which override an optional settings file (JSON
or TOML), which overrides the defaults here.

Defaults are safe for a sidecar: both ports listen on loopback unless told otherwise.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from guard.errors import GuardError
from guard.runtime.policy import FailurePolicy, Policy

DEFAULT_PORT = 8001
DEFAULT_METRICS_PORT = 8002
# ONNX Runtime makes as many threads as asked: a million took 20 GiB before the kernel killed the process.
MAX_THREADS = 1024

#: GUARD_* variables that are not serve settings: the settings file, the eval's data, and the address the deploy
#: examples give an app for calling guard (a ConfigMap shared by both containers may carry it). Read in this case only.
OTHER_VARIABLES = frozenset({"GUARD_CONFIG", "GUARD_FASHION_MNIST_DIR", "GUARD_ADDRESS"})
PORT_SETTINGS = ("port", "metrics_port", "health_port")
# Kubernetes gives every pod variables for each Service in its namespace; one named guard… makes GUARD_SERVICE_HOST,
# GUARD_SERVICE_PORT[_NAME], GUARD_PORT=tcp://ip:port and GUARD_PORT_<n>_TCP[_PROTO|_PORT|_ADDR]. Docker's legacy
# links (--link x:guard) make the same _PORT forms, GUARD_NAME=/… and GUARD_ENV_<name>.
_LINK_NAME = re.compile(r"_service_host$|_service_port(_\w+)?$|_port_\d+_(tcp|udp|sctp)(_proto|_port|_addr)?$"
                        r"|_env_")
_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://", re.IGNORECASE)


def is_link(lower: str, value: str) -> bool:
    """Whether a variable (its name lowercased) is one Kubernetes or Docker made to say where a service is."""
    return bool(_LINK_NAME.search(lower) or (lower.endswith("_port") and _LINK_VALUE.match(value))
                or (lower.endswith("_name") and value.startswith("/")))


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
    health_port: int | None = Field(None, ge=0, le=65535,
                                    description="also answer health checks on this port of `host`, plaintext, from a "
                                    "server of its own: probes get through while callers hold every call of the main "
                                    "port, and kubelet gRPC probes work with TLS on (0: a free one; default: none)")
    device: str = Field("cpu", pattern="^(cpu|cuda)$", description="where the model runs")
    policy: Policy = Field(Policy.ENFORCE, description="monitor: flag only; enforce: answer benign re-predictions")
    max_batch: int = Field(1024, ge=1, description="most samples one request may carry")
    max_message_mb: int = Field(64, ge=1, le=2047, description="largest gRPC message accepted, in MiB (gRPC's "
                                                                "limit is a 32-bit byte count)")
    workers: int = Field(8, ge=1, description="inference requests the engine works on at once")
    max_inflight: int = Field(64, ge=1, description="inference requests held at once, running or waiting for one "
                                                    "of the workers; more are refused at once (RESOURCE_EXHAUSTED)")
    threads: int = Field(0, ge=0, le=MAX_THREADS, description="the engine's intra-op threads per run (0: one per core)")
    batch_size: int = Field(0, ge=0, description="dynamic batching: join concurrent requests into engine runs of up "
                                                 "to this many samples (0: off, each request runs alone)")
    batch_delay_ms: float = Field(2.0, ge=0, le=60_000, allow_inf_nan=False,
                                  description="dynamic batching: longest a request waits for others")
    engine: str = Field("onnxruntime", pattern="^(onnxruntime|torch)$",
                        description="onnxruntime, or torch (the same graphs through guard's torch bridge)")
    grace_seconds: float = Field(30.0, ge=0, le=86_400, allow_inf_nan=False,
                                 description="how long SIGTERM waits for in-flight requests")
    on_check_failure: FailurePolicy = Field(FailurePolicy.CLOSED, description="closed: refuse a request the guard "
                                            "could not check (UNAVAILABLE); open: answer it unguarded, marked")
    check_budget_ms: float = Field(0.0, ge=0, le=60_000, allow_inf_nan=False,
                                   description="the guarded run may take this long per sample of its batch before "
                                               "it counts as a failed check (0: no limit)")
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

    @field_validator("host", "metrics_host")
    @classmethod
    def _bare_host(cls, host: str) -> str:
        return bare_host(host)

    @model_validator(mode="after")
    def _ports_apart(self) -> ServeSettings:
        """Two of guard's servers on one port: the second failed to bind with "Address already in use"."""
        bound = [("--port", self.host, self.port), ("--metrics-port", self.metrics_host, self.metrics_port),
                 ("--health-port", self.host, self.health_port)]
        for i, (flag, host, port) in enumerate(bound):
            for other, other_host, other_port in bound[i + 1:]:
                if port and port == other_port and _overlap(host, other_host):
                    raise ValueError(f"{flag} and {other} are both {port}: each of guard's servers needs its own port")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> ServeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together (TLS needs both)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.stem


def _overlap(host: str, other: str) -> bool:
    """Whether one port on both hosts clashes: the same host, or a wildcard and a host of its family (`::` takes
    both families; ::1 and 0.0.0.0 bind one port side by side)."""
    if host == other or "::" in (host, other):
        return True
    return any(wild in ("0.0.0.0", "") and ":" not in named for wild, named in ((host, other), (other, host)))


def bare_host(host: str) -> str:
    """An IPv6 address given as `::` or `[::]` alike: gRPC needs the brackets and the metrics server refuses them, so
    a host is kept bare and `host_port` adds them."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets ([::]:8001)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _OnlyGiven(ServeSettings):
    """ServeSettings whose only source is the values given: no GUARD_* variable, no settings file."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any,
                                   **environment: Any) -> tuple[Any, ...]:
        return (init_settings,)


def given_settings(**values: Any) -> ServeSettings:
    """Settings from `values` and the defaults alone, for a server guard starts for itself (`guard demo`): a deployed
    GUARD_HOST=0.0.0.0 or GUARD_AUTH_TOKEN_FILE is meant for `guard serve`, not for a loopback demo."""
    return _OnlyGiven(**values)


def load_settings(flags: dict[str, Any], config: Path | None = None) -> ServeSettings:
    """The settings from `flags` (the ones given), then GUARD_* variables, then the settings file (`config`, else
    $GUARD_CONFIG), then the defaults. Raises pydantic's ValidationError for a bad value, and a GuardError for a file
    that cannot be read or names a setting that does not exist, and for a variable that sets nothing."""
    check_variables(os.environ, given=set(flags))
    return ServeSettings(**{**settings_from_file(flags, config)[1], **flags})


def settings_from_file(flags: dict[str, Any], config: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The settings file (`config`, else $GUARD_CONFIG's, else None) and the values of it that count: those no flag
    and no GUARD_* variable gives."""
    path = config or (Path(os.environ["GUARD_CONFIG"]) if os.environ.get("GUARD_CONFIG") else None)
    in_env = {name.lower() for name in os.environ}  # pydantic-settings lowercases the variables' names
    values = {} if path is None else read_settings_file(path)
    return path, {k: v for k, v in values.items() if k not in flags and f"guard_{k}" not in in_env}


def check_variables(environ: Mapping[str, str], given: AbstractSet[str] = frozenset()) -> None:
    """Refuse GUARD_* variables that would be ignored: a misspelt name (GUARD_AUTH_TOKEN for GUARD_AUTH_TOKEN_FILE)
    leaves its setting at the default without a word, which for a security setting is a guard serving open. Names
    are matched as pydantic-settings matches them (lowercased). The variables Kubernetes and Docker make for a
    service named guard… are let be, unless one lands on a port setting that no flag (`given`) overrides."""
    settings = {f"guard_{name}": name for name in ServeSettings.model_fields}
    unknown, links = [], []
    for name, value in sorted(environ.items()):
        lower = name.lower()
        if not lower.startswith("guard_") or name in OTHER_VARIABLES:
            continue
        setting = settings.get(lower)
        if setting in PORT_SETTINGS and _LINK_VALUE.match(value) and setting not in given:
            service = lower.removesuffix("_port").replace("_", "-")
            links.append(f"{name}={value!r} is the address of a Service named {service} (Kubernetes makes it for "
                         f"every pod in the namespace), not a port: pass --{setting.replace('_', '-')}, or set "
                         "enableServiceLinks: false on the pod")
        elif setting is None and not is_link(lower, value):
            names = sorted([f"GUARD_{n.upper()}" for n in settings.values()] + list(OTHER_VARIABLES))
            close = difflib.get_close_matches(name.upper(), names, n=1)
            unknown.append(f"{name} sets nothing" + (f" (did you mean {close[0]}?)" if close else ""))
    problems = links
    if unknown:
        problems.append("; ".join(unknown) + " (unset it; `guard serve --help` lists the settings, each also a "
                        "GUARD_<NAME> variable)")
    if problems:
        raise GuardError("; ".join(problems))


def file_settings(config: Path | None = None) -> dict[str, Any]:
    """The settings file's values: `config`, else $GUARD_CONFIG's file, else none."""
    path = config or (Path(os.environ["GUARD_CONFIG"]) if os.environ.get("GUARD_CONFIG") else None)
    return {} if path is None else read_settings_file(path)


def _repeated(keys: list[str]) -> list[str]:
    return sorted({key for key in keys if keys.count(key) > 1})


def _without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: json.loads keeps a repeated key's last value without a word."""
    twice = _repeated([key for key, _ in pairs])
    if twice:
        raise ValueError(f"{twice} given more than once")
    return dict(pairs)


def read_settings_file(path: Path) -> dict[str, Any]:
    """A JSON object or TOML table of settings, keyed by their names (`max_batch`, or `max-batch` as the flag)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GuardError(f"cannot read the settings file {path}: {exc}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=_without_repeats)
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
    named = [str(key).replace("-", "_") for key in values]
    twice = _repeated(named)
    if twice:  # `auth-token-file` and `auth_token_file` both given: the last one silently won
        raise GuardError(f"the settings file {path} gives {twice} more than once (as max_batch and max-batch, say)")
    values = dict(zip(named, values.values(), strict=True))
    unknown = sorted(set(values) - set(ServeSettings.model_fields))
    if unknown:
        raise GuardError(f"the settings file {path} names unknown settings {unknown}; `guard serve --help` lists them")
    # pydantic takes true and false for 1 and 0: "health_port": false, meant as off, started a health server
    flags = sorted(key for key, value in values.items()
                   if isinstance(value, bool) and ServeSettings.model_fields[key].annotation is not bool)
    if flags:
        raise GuardError(f"the settings file {path} gives true or false for {flags}, which are not on/off settings; "
                         "leave a setting out for its default")
    return values
