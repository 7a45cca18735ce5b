"""deploy/ checked with real parts: promtool on the rules and the scrape config, and a real Prometheus scraping a real
`guard serve` on loopback, asked every expression the Grafana dashboard and the alert rules use."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from conftest import Backdoored
from guard.config import ServeSettings
from guard.runtime.guard import Guard
from guard.server.app import GuardServer

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "guard.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed for the deploy tests: apt-get install prometheus")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], check=False,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _series(per_step_before: float, per_step_after: float, before: int, after: int) -> str:
    """A counter's values in promtool's notation: `before` steps growing by one amount, then `after` by another."""
    return f"0+{per_step_before}x{before} {per_step_before * before}+{per_step_after}x{after}"


@pytest.mark.parametrize(("per_minute", "pages"), [(2, False), (60, True)])
def test_flagged_share_alerts_wait_for_enough_samples(tmp_path, per_minute: int, pages: bool) -> None:
    """An hour of 5% flagged (what a profile flags on clean traffic), then half of the samples flagged. At two samples a
    minute that is a handful of samples, which clean traffic gives often (a review counted 10 GuardFlaggedShareHigh
    pages a day at one a minute), and neither alert may page; at 60 a minute it is an attack, and both page."""
    rules = yaml.safe_load(RULES.read_text())["groups"][1]["rules"]
    step = per_minute / 4  # samples every 15 s
    series = [{"series": f'guard_samples_total{{namespace="shop",model="m",verdict="{verdict}"}}',
               "values": _series(step * before, step * after, 240, 40)}
              for verdict, before, after in (("clean", 0.95, 0.5), ("flagged", 0.05, 0.5))]
    checks = []
    for alert in ("GuardFlaggedShareHigh", "GuardFlaggedShareSpike"):
        rule = next(r for r in rules if r["alert"] == alert)
        summary = rule["annotations"]["summary"].replace("{{ $labels.model }}", "m").replace(
            "{{ $value | humanizePercentage }}", "50%")
        expected = [{"exp_labels": {"namespace": "shop", "model": "m", **rule["labels"]},
                     "exp_annotations": {**rule["annotations"], "summary": summary}}]
        checks.append({"eval_time": "67m", "alertname": alert, "exp_alerts": expected if pages else []})
    test = {"interval": "15s", "input_series": series, "alert_rule_test": checks}
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "15s",
                                                       "tests": [test]}))
    out = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "test.yml")], check=False,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(("code", "per_step", "pages"), [("CANCELLED", 40, False), ("UNAVAILABLE", 40, True),
                                                         ("INVALID_ARGUMENT", 0.2, False)])
def test_callers_cancels_do_not_page_as_errors(tmp_path, code: str, per_step: float, pages: bool) -> None:
    """A fifth of the calls ending in `code` for ten minutes: refused ones page GuardErrorsHigh, a caller's own
    cancels (hedged or abandoned calls) are not the guard failing, and at about one call a minute a few callers'
    mistakes are too few to page on."""
    rules = yaml.safe_load(RULES.read_text())["groups"][1]["rules"]
    series = [{"series": 'guard_requests_total{namespace="shop",model="m",verdict="clean"}',
               "values": f"0+{per_step}x40"},
              {"series": f'guard_request_errors_total{{namespace="shop",model="m",code="{code}"}}',
               "values": f"0+{per_step / 4}x40"}]
    rule = next(r for r in rules if r["alert"] == "GuardErrorsHigh")
    summary = rule["annotations"]["summary"].replace("{{ $labels.model }}", "m").replace(
        "{{ $value | humanizePercentage }}", "20%")
    expected = [{"exp_labels": {"namespace": "shop", "model": "m", **rule["labels"]},
                 "exp_annotations": {**rule["annotations"], "summary": summary}}]
    test = {"interval": "15s", "input_series": series,
            "alert_rule_test": [{"eval_time": "10m", "alertname": "GuardErrorsHigh",
                                 "exp_alerts": expected if pages else []}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "15s",
                                                       "tests": [test]}))
    out = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "test.yml")], check=False,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_scrape_config(tmp_path) -> None:
    """Debian's Prometheus is built without Kubernetes discovery, so promtool here checks the file with that one
    block swapped for a static target; the block itself is checked by shape (it must keep the port the sidecar
    manifest names)."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_container_port_name"] and keep["regex"] == "guard-metrics"
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:8002"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path / "rules.yml")
    out = subprocess.run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def stack(backdoored: Backdoored, tmp_path_factory):
    """guard serve + a Prometheus scraping it every second and evaluating guard's rules every second."""
    prometheus = tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    with contextlib.ExitStack() as cleanup:
        server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                           metrics_port=0))
        server.start()
        cleanup.callback(server.stop, grace=1)
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
        (root / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yml"],
                  "scrape_configs": [{"job_name": "guard",
                                      "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}]}
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = cleanup.enter_context((root / "prometheus.log").open("w"))
        process = subprocess.Popen([prometheus, f"--config.file={root / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(stop_process, process)
        api = f"http://127.0.0.1:{port}"
        wait_for(lambda: query(api, 'up{job="guard"}') == [1.0], "Prometheus to scrape guard", root)
        yield server, api, root


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def query(api: str, expr: str) -> list[float]:
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return []
    assert body["status"] == "success", body
    return [float(item["value"][1]) for item in body["data"]["result"]]


def wait_for(condition, what: str, root: Path, seconds: float = 60) -> None:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"waited {seconds} s for {what}; Prometheus said: {(root / 'prometheus.log').read_text()[-2000:]}")


def dashboard_expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard, keyed by panel title and target, with Grafana's variables filled in
    (a minute holds plenty of 1-second scrapes)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {f"{panel['title']} / {target['refId']}": target["expr"]
             for panel in dashboard["panels"] for target in panel["targets"]}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs[f"variable {variable['name']}"] = variable["query"]["query"].removeprefix("label_values(").split(", ")[0]
    assert "$__interval" not in json.dumps(exprs)  # one scrape per window at the default zoom: use $__rate_interval
    return {k: e.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$namespace", ".*")
            for k, e in exprs.items()}


def finite(values: list[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def test_dashboard_and_rules_answer_from_real_traffic(stack, backdoored: Backdoored) -> None:
    server, api, root = stack
    triggered, _ = backdoored.triggered()
    sent = flagged = 0
    local = Guard.load(backdoored.model_path, backdoored.profile_path)
    confirmed = backdoored.x_eval[local.predict(backdoored.x_eval).spared]  # past the demote threshold, yet kept
    assert len(confirmed), "the reference must spare some clean request's demotion for the spared series to mean much"
    batches = [*np.split(backdoored.x_eval[:200], 20), *np.split(triggered[:100], 5), confirmed]
    refused = 3
    # GuardErrorsHigh waits for 20 requests in 5 minutes; with 19 it fired only while Prometheus's extrapolation of
    # `increase` happened to round the count up, so send well over 20.
    assert len(batches) + refused >= 25
    with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        for x in batches:
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(x))
            flagged += int(client.infer("badnets", [tensor]).as_numpy("guard_flagged").sum())
            sent += len(x)
        for _ in range(refused):  # refused requests, for the error panel and the error-share rule
            bad = triton.InferInput("input", [1, 1, 27, 28], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 1, 27, 28), np.float32))
            with pytest.raises(InferenceServerException):
                client.infer("badnets", [bad])
    share = flagged / sent
    assert 0.2 < share < 0.6, "the traffic must hold both clean and flagged samples"
    wait_for(lambda: query(api, "sum(guard_samples_total)") == [float(sent)], "the traffic to be scraped", root)
    time.sleep(3)  # a few more scrapes and rule evaluations

    panels = dashboard_expressions()
    for name, expr in panels.items():
        assert finite(query(api, expr)), f"no finite value for the dashboard's {name}: {expr!r}"
    shares = "Flagged, demoted, overruled and spared share of samples"
    dashboard_share = query(api, panels[f"{shares} / A"])
    assert dashboard_share == pytest.approx([share], abs=0.01), "the flagged-share panel must match what was sent"
    answered = [local.predict(x) for x in batches]
    demoted = sum(int(result.demoted.sum()) for result in answered)
    assert demoted > 0, "some triggered request must be demoted for the demoted series to mean much"
    assert query(api, panels[f"{shares} / B"]) == pytest.approx([demoted / sent], abs=0.01)
    overruled = sum(int(result.overruled.sum()) for result in answered)
    assert overruled > 0, "the reference must overrule some request for the overruled series to mean much"
    assert query(api, panels[f"{shares} / C"]) == pytest.approx([overruled / sent], abs=0.01)
    spared = sum(int(result.spared.sum()) for result in answered)
    assert query(api, panels[f"{shares} / D"]) == pytest.approx([spared / sent], rel=0.1)
    assert max(query(api, panels["Errors by gRPC code / A"])) > 0, "the refused requests must show as errors"

    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        assert finite(query(api, rule["record"])), f"recording rule {rule['record']} has no finite value"
    assert query(api, "guard:latency_seconds:p99_5m")[0] > 0
    assert query(api, "guard:flagged_share:rate5m") == pytest.approx([share], abs=0.01)
    assert query(api, "guard:error_share:rate5m")[0] == pytest.approx(refused / (len(batches) + refused), abs=0.03)
    with urllib.request.urlopen(f"{api}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]
    evaluated = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(evaluated) == {r.get("alert", r.get("record")) for g in rules["groups"] for r in g["rules"]}
    assert all(rule["health"] == "ok" for rule in evaluated.values()), evaluated
    # The traffic above puts these two alerts into pending (their `for` has not run out); a ready, scraped server
    # must not look unready.
    wait_for(lambda: {"GuardFlaggedShareHigh", "GuardErrorsHigh"}
             <= {name for name, state in _alert_states(api).items() if state != "inactive"},
             "the flagged-share and error alerts to go pending", root, seconds=20)
    assert _alert_states(api)["GuardModelNotReady"] == "inactive"


def _alert_states(api: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{api}/api/v1/rules?type=alert", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]
    return {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}


# ------------------------------------------------------------------------------------- manifests and images


def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_sidecar_manifest_matches_what_guard_serve_really_does() -> None:
    from guard.cli import build_parser
    from guard.config import ServeSettings
    from guard.server.app import HEALTH_SERVICES

    deployment = next(d for d in manifests() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    guard = next(c for c in pod["spec"]["initContainers"] if c["name"] == "guard")
    assert guard["restartPolicy"] == "Always", "a native sidecar is an init container that restarts always"
    args = build_parser().parse_args(["serve", *guard["args"]])  # every flag is one `guard serve` knows
    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    assert {"model", "profile", "port", "metrics_port", "health_port", "host", "metrics_host"} <= set(given)
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    assert ports == {"guard-grpc": args.port, "guard-metrics": args.metrics_port, "guard-health": args.health_port}
    assert args.host == "0.0.0.0", "kubelet gRPC probes reach the pod IP, so guard must not listen on loopback only"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = guard[probe]["grpc"]
        # the health port: a server of its own, which callers holding the main port's calls cannot starve
        assert grpc_probe["port"] == args.health_port and grpc_probe["service"] in HEALTH_SERVICES, probe
    mounts = {m["name"]: m for m in guard["volumeMounts"]}
    for path in (args.model, args.profile):
        assert any(path.startswith(m["mountPath"] + "/") for m in mounts.values()), path
    assert all(m.get("readOnly") for m in mounts.values())
    assert guard["resources"]["requests"]["cpu"] and guard["resources"]["requests"]["memory"]
    assert args.threads == 1, "ONNX Runtime's default pool has a thread per core of the node, not of the pod"
    for container in (*pod["spec"]["initContainers"], *pod["spec"]["containers"]):  # Pod Security "restricted"
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["seccompProfile"]
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert set(mounts) <= volumes

    monitor = next(d for d in manifests() if d["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["guard-metrics"]
    # the job GuardModelNotReady looks for, whatever the PodMonitor is named (the operator's is namespace/name)
    job = [r["replacement"] for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"] if r["targetLabel"] == "job"]
    not_ready = next(r for r in yaml.safe_load(RULES.read_text())["groups"][1]["rules"]
                     if r["alert"] == "GuardModelNotReady")
    assert job == ["guard"] and 'up{job=~"(.*/)?guard"}' in not_ready["expr"]
    rule = next(d for d in manifests() if d["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], "prometheusrule.yaml drifted"
    policy = next(d for d in manifests() if d["kind"] == "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert args.metrics_port in allowed and args.port not in allowed and args.health_port not in allowed
    scrape = next(rule for rule in policy["spec"]["ingress"] if args.metrics_port in {p["port"] for p in rule["ports"]})
    assert scrape.get("from"), "the metrics (a score histogram) only to where Prometheus runs, not to every pod"
    assert args.audit_log == "-", "who sent flagged requests, into the container's log"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_agree_with_the_server_defaults(name: str) -> None:
    import shlex

    from guard.cli import build_parser
    from guard.config import DEFAULT_METRICS_PORT, DEFAULT_PORT

    text = (DEPLOY / "docker" / name).read_text().replace("\\\n", " ")  # join continued lines
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    instruction = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert {int(p) for p in instruction["EXPOSE"].split()} == {DEFAULT_PORT, DEFAULT_METRICS_PORT}
    assert json.loads(instruction["ENTRYPOINT"]) == ["guard", "serve"]
    args = build_parser().parse_args(["serve", *json.loads(instruction["CMD"])])
    assert args.model.startswith("/models/") and args.profile.startswith("/models/")
    health = json.loads(instruction["HEALTHCHECK"].split("CMD", 1)[1])
    parsed = build_parser().parse_args(health[1:])
    assert health[0] == "guard" and parsed.command == "health" and parsed.port is None  # served_port() decides
    assert instruction["USER"] not in ("root", "0")
    assert sum(line.startswith("FROM ") for line in lines) >= 2, "multi-stage: build tools stay out of the image"
    env = dict(item.split("=", 1) for item in shlex.split(instruction["ENV"]))
    assert env["GUARD_HOST"] == env["GUARD_METRICS_HOST"] == "0.0.0.0"  # published ports must reach the server
    if name.endswith("cuda"):
        assert env["GUARD_DEVICE"] == "cuda" and '".[gpu]"' in "\n".join(lines)


def test_health_command_reports_the_real_server(stack, capsys, monkeypatch) -> None:
    from guard.cli import main

    server, _, _ = stack
    assert main(["health", "--port", str(server.port)]) == 0
    assert main(["health", "--port", str(server.port), "--service", "guard.v1.Guard"]) == 0
    assert "SERVING" in capsys.readouterr().out
    monkeypatch.setenv("GUARD_PORT", str(server.port))  # no --port: the line names the port it found (not None)
    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == f"guard: 127.0.0.1:{server.port} (server): SERVING"
    assert main(["health", "--port", str(server.port), "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().err.strip() == ("guard: unhealthy: NOT_FOUND: no health service 'no.such.Service'; a "
                                               "guard server reports '', 'inference.GRPCInferenceService', "
                                               "'guard.v1.Guard'")  # gRPC's own reason is empty
    assert main(["health", "--port", str(free_port()), "--timeout", "1"]) == 1


def test_health_finds_the_port_where_serve_does(monkeypatch, capsys, tmp_path) -> None:
    """`guard health` with no --port probes $GUARD_PORT, else the settings file's port, else the default; a bad value
    fails only that command, in one line."""
    from guard.cli import main, served_port
    from guard.config import DEFAULT_PORT

    monkeypatch.delenv("GUARD_PORT", raising=False)
    monkeypatch.delenv("GUARD_CONFIG", raising=False)
    assert served_port() == DEFAULT_PORT
    config = tmp_path / "guard.json"
    config.write_text(json.dumps({"port": 9124}))
    monkeypatch.setenv("GUARD_CONFIG", str(config))
    assert served_port() == 9124
    monkeypatch.setenv("GUARD_PORT", "9123")
    assert served_port() == 9123
    monkeypatch.setenv("GUARD_PORT", "8001x")
    assert main([]) == 2  # other commands (here: none, so the help) still build their parser
    assert main(["health"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["guard: error: the port must be an integer, got '8001x' (GUARD_PORT or the settings file)"]


def test_health_refuses_a_port_or_timeout_it_would_not_probe_as_given(capsys) -> None:
    """gRPC wraps port 70000 round to 4464 and probes whatever listens there; a timeout of -1 or NaN is no probe."""
    from guard.cli import main

    for argv, fragment in ((["--port", "70000"], "the port must lie in 1..65535, got 70000"),
                           (["--port", "-5"], "got -5"),
                           (["--port", "8001", "--timeout", "nan"], "--timeout must be a number of seconds"),
                           (["--port", "8001", "--timeout", "-1"], "--timeout must be a number of seconds")):
        assert main(["health", *argv]) == 2
        assert fragment in capsys.readouterr().err
    # an IPv6 address is bracketed in the target: the probe reaches ::1 port 1 (refused there), not a name "::1:1"
    assert main(["health", "--host", "::1", "--port", "1", "--timeout", "5"]) == 1
    assert "::1%5D:1" in capsys.readouterr().err
