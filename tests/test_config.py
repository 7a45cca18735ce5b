"""Where `guard serve`'s settings come from: flags, then GUARD_* variables, then a settings file, then defaults; and
a settings file it cannot use is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import Backdoored
from guard.config import DEFAULT_PORT, given_settings, load_settings
from guard.errors import GuardError
from guard.runtime.policy import Policy


def test_flags_beat_variables_which_beat_the_file_which_beats_the_defaults(
        backdoored: Backdoored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "guard.json"
    config.write_text(json.dumps({"model": str(backdoored.model_path), "profile": str(backdoored.profile_path),
                                  "port": 1111, "max-batch": 7, "policy": "monitor", "workers": 3}))
    monkeypatch.setenv("GUARD_POLICY", "enforce")
    monkeypatch.setenv("guard_workers", "5")  # pydantic-settings reads the variables in any case; so does the filter
    settings = load_settings({"port": 2222}, config)
    assert settings.port == 2222  # flag over file
    assert settings.policy is Policy.ENFORCE and settings.workers == 5  # variables over file
    assert settings.max_batch == 7 and settings.model == backdoored.model_path  # file over defaults
    assert settings.metrics_port == 8002 and load_settings({"model": backdoored.model_path,
                                                            "profile": backdoored.profile_path}).port == DEFAULT_PORT


def test_a_toml_file_reads_like_json(backdoored: Backdoored, tmp_path: Path) -> None:
    config = tmp_path / "guard.toml"
    config.write_text(f'model = "{backdoored.model_path}"\nprofile = "{backdoored.profile_path}"\n'
                      'batch_size = 16\nbatch-delay-ms = 0.5\n')
    settings = load_settings({}, config)
    assert (settings.batch_size, settings.batch_delay_ms) == (16, 0.5)


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("guard.json", '{"port": 1, "max_bach": 3}', r"unknown settings \['max_bach'\]"),
    ("guard.json", '{"port": ', "is malformed"),
    ("guard.json", "[1, 2]", "must hold one object of settings, got list"),
    ("guard.toml", "port = = 3", "is malformed"),
    ("guard.yaml", "port: 3", "must be .json or .toml"),
    # pydantic reads false as 0, and a health port of 0 starts a health server on a free port
    ("guard.json", '{"health_port": false, "reflection": false}', r"true or false for \['health_port'\]"),
    ("guard.toml", "max_batch = true\nport = false", r"true or false for \['max_batch', 'port'\]"),
    # the last of a setting given twice won without a word: a null token file, and guard served without a token
    ("guard.json", '{"auth_token_file": "token", "auth-token-file": null}', r"gives \['auth_token_file'\] more than once"),
    ("guard.json", '{"policy": "enforce", "policy": "monitor"}', r"is malformed: \['policy'\] given more than once"),
    ("guard.toml", 'max_batch = 5\n"max-batch" = 7', r"gives \['max_batch'\] more than once"),
])
def test_a_settings_file_it_cannot_use_is_refused(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(GuardError, match=fragment):
        load_settings({}, tmp_path / name)
    with pytest.raises(GuardError, match="cannot read the settings file"):
        load_settings({}, tmp_path / "absent.json")


def test_given_settings_take_no_variable(backdoored: Backdoored, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server guard starts for itself (guard demo) is not the deployment's: its variables stay with guard serve."""
    monkeypatch.setenv("GUARD_HOST", "0.0.0.0")
    monkeypatch.setenv("GUARD_MAX_BATCH", "100")
    settings = given_settings(model=backdoored.model_path, profile=backdoored.profile_path, port=0)
    assert (settings.host, settings.max_batch, settings.port) == ("127.0.0.1", 1024, 0)
    assert load_settings({"model": backdoored.model_path, "profile": backdoored.profile_path}).host == "0.0.0.0"


def test_a_bad_value_in_the_file_is_a_validation_error_naming_it(backdoored: Backdoored, tmp_path: Path) -> None:
    config = tmp_path / "guard.json"
    config.write_text(json.dumps({"model": str(backdoored.model_path), "profile": str(backdoored.profile_path),
                                  "port": 70000}))
    with pytest.raises(ValidationError, match="port"):
        load_settings({}, config)


def test_limits_and_switches_a_flag_can_set(backdoored: Backdoored) -> None:
    """The message limit stays within gRPC's 32-bit option (2048 MiB overflowed it at start-up), and --no-reflection
    can switch off what a settings file switched on."""
    from guard.cli import build_parser

    paths = {"model": backdoored.model_path, "profile": backdoored.profile_path}
    assert load_settings({**paths, "max_message_mb": 2047}).max_message_mb == 2047
    with pytest.raises(ValidationError, match="max_message_mb"):
        load_settings({**paths, "max_message_mb": 2048})
    assert build_parser().parse_args(["serve", "--no-reflection"]).reflection is False
    assert build_parser().parse_args(["serve"]).reflection is None  # not given: the variable or the file decides


@pytest.mark.parametrize("name, value", [("batch_delay_ms", float("inf")), ("batch_delay_ms", 1e13),
                                         ("grace_seconds", float("inf")), ("check_budget_ms", float("inf")),
                                         ("check_budget_ms", 1e13)])
def test_times_are_finite(backdoored: Backdoored, name: str, value: float) -> None:
    """An endless delay or grace overflowed the thread waits they become (the batcher's thread died of it)."""
    paths = {"model": backdoored.model_path, "profile": backdoored.profile_path}
    with pytest.raises(ValidationError, match=name):
        load_settings({**paths, name: value})


def test_a_variable_that_sets_nothing_is_refused(backdoored: Backdoored, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt GUARD_* name would leave its setting at the default: for the token file, a guard serving open."""
    paths = {"model": backdoored.model_path, "profile": backdoored.profile_path}
    monkeypatch.setenv("GUARD_AUTH_TOKEN", "s3cret")
    with pytest.raises(GuardError, match=r"GUARD_AUTH_TOKEN sets nothing \(did you mean GUARD_AUTH_TOKEN_FILE\?\)"):
        load_settings(paths)
    monkeypatch.delenv("GUARD_AUTH_TOKEN")
    monkeypatch.setenv("guard_max_bach", "3")  # read in any case, as pydantic-settings reads the real ones
    with pytest.raises(GuardError, match="guard_max_bach sets nothing"):
        load_settings(paths)
    monkeypatch.delenv("guard_max_bach")
    # GUARD_CONFIG is read in that case only: a lowercase one would be a settings file silently not read
    monkeypatch.setenv("guard_config", "/etc/guard.json")
    with pytest.raises(GuardError, match=r"guard_config sets nothing \(did you mean GUARD_CONFIG\?\)"):
        load_settings(paths)


def test_kubernetes_service_links_are_let_be_unless_they_take_a_port(backdoored: Backdoored,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A Service named guard (or guard-metrics) in the namespace gives every pod its address in GUARD_* variables."""
    paths = {"model": backdoored.model_path, "profile": backdoored.profile_path}
    links = {"GUARD_SERVICE_HOST": "10.96.0.7", "GUARD_SERVICE_PORT": "8001", "GUARD_SERVICE_PORT_GRPC": "8001",
             "GUARD_PORT_8001_TCP": "tcp://10.96.0.7:8001", "GUARD_PORT_8001_TCP_PROTO": "tcp",
             "GUARD_PORT_8001_TCP_PORT": "8001", "GUARD_PORT_8001_TCP_ADDR": "10.96.0.7",
             "GUARD_GRPC_PORT": "tcp://10.96.0.8:8001", "GUARD_CONFIG": "", "GUARD_ADDRESS": "localhost:8001",
             "GUARD_NAME": "/app/guard", "GUARD_ENV_LANG": "C.UTF-8"}  # the last two: a Docker legacy link
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert load_settings(paths).port == DEFAULT_PORT
    monkeypatch.setenv("GUARD_METRICS_PORT", "tcp://10.96.0.9:8002")  # a Service named guard-metrics
    with pytest.raises(GuardError, match=r"address of a Service named guard-metrics.*--metrics-port"):
        load_settings(paths)
    monkeypatch.setenv("GUARD_PORT", "tcp://10.96.0.7:8001")  # would be read as the port
    with pytest.raises(GuardError, match=r"GUARD_PORT='tcp://10\.96\.0\.7:8001' is the address of a Service named "
                                         r"guard .*--port"):
        load_settings({**paths, "metrics_port": 0})
    settings = load_settings({**paths, "port": 9001, "metrics_port": 0})  # flags override both, so they are harmless
    assert (settings.port, settings.metrics_port) == (9001, 0)
    # guard health, which has no --port of serve's to see, takes the file's port or the default over a link
    from guard.cli import served_port

    assert served_port() == DEFAULT_PORT


def test_guard_serve_names_the_flag_and_variable_of_a_bad_setting(backdoored: Backdoored, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """pydantic's own words ("profile: Field required", "port: Input should be a valid integer") named neither the
    flag nor the variable a user set."""
    from guard.cli import main

    assert main(["serve", str(backdoored.model_path)]) == 2
    assert capsys.readouterr().err.strip() == "guard: error: invalid settings: --profile (GUARD_PROFILE) is required"
    assert main(["serve", str(backdoored.model_path), "--profile", str(backdoored.profile_path),
                 "--tls-cert", str(backdoored.model_path)]) == 2
    assert "invalid settings: --tls-cert and --tls-key go together" in capsys.readouterr().err
    monkeypatch.setenv("GUARD_PORT", "abc")
    assert main(["serve", str(backdoored.model_path), "--profile", str(backdoored.profile_path)]) == 2
    err = capsys.readouterr().err
    assert "--port (GUARD_PORT): Input should be a valid integer" in err and "got 'abc'" in err
    monkeypatch.delenv("GUARD_PORT")
    assert main(["serve", str(backdoored.model_path), "--profile", str(backdoored.profile_path),
                 "--auth-token-file", "absent-token"]) == 2
    err = capsys.readouterr().err  # the value once, in pydantic's message, not again after it
    assert "--auth-token-file (GUARD_AUTH_TOKEN_FILE): file not found: absent-token\n" in err, err
    # a value from the settings file is named as the file's
    config = tmp_path / "guard.json"
    config.write_text('{"port": "eighty", "workers": 2}')
    assert main(["serve", str(backdoored.model_path), "--profile", str(backdoored.profile_path),
                 "--config", str(config)]) == 2
    assert f"port in the settings file {config}: Input should be a valid integer" in capsys.readouterr().err


@pytest.mark.parametrize(("ports", "clash"), [
    ({"port": 9001, "metrics_port": 9001}, "--port and --metrics-port are both 9001"),
    ({"port": 9001, "health_port": 9001}, "--port and --health-port are both 9001"),
    ({"metrics_port": 9002, "health_port": 9002, "metrics_host": "0.0.0.0"}, "--metrics-port and --health-port"),
])
def test_two_of_guards_servers_on_one_port_are_refused(backdoored: Backdoored, ports: dict, clash: str) -> None:
    """The second server failed to bind with "Address already in use", which did not say it was guard's own."""
    with pytest.raises(ValidationError, match=clash):
        given_settings(model=backdoored.model_path, profile=backdoored.profile_path, **ports)
    for host, metrics_host in (("127.0.0.1", "127.0.0.2"), ("::1", "0.0.0.0")):  # one port on two interfaces binds
        apart = given_settings(model=backdoored.model_path, profile=backdoored.profile_path, host=host, port=9001,
                               metrics_port=9001, metrics_host=metrics_host)
        assert apart.port == apart.metrics_port == 9001
    with pytest.raises(ValidationError, match="both 9001"):  # `::` takes both families
        given_settings(model=backdoored.model_path, profile=backdoored.profile_path, host="::", port=9001,
                       metrics_port=9001, metrics_host="127.0.0.1")
