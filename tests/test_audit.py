"""The audit log: a real server writes one JSON line per request holding a flagged sample, naming the caller, the
request id and each flagged sample's evidence; clean requests write nothing; the lines agree with the metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from conftest import TARGET, Backdoored
from guard.config import ServeSettings
from guard.errors import GuardError
from guard.runtime.guard import Guard
from guard.server._proto.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.server.app import GuardServer
from guard.server.audit import AuditLog


def scrape(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_flagged_requests_are_audited_with_their_caller_and_evidence(backdoored: Backdoored, tmp_path: Path) -> None:
    log = tmp_path / "audit" / "guard.jsonl"
    log.parent.mkdir()
    guard = Guard.load(backdoored.model_path, backdoored.profile_path)
    clean = backdoored.x_eval[:200]
    answered = guard.predict(clean)
    unflagged = clean[~answered.flagged & ~answered.overruled][:8]
    triggered = backdoored.triggered()[0][:8]
    everything = guard.predict(backdoored.x_eval)
    confirmed = backdoored.x_eval[everything.spared]  # past the demote threshold, yet kept
    assert len(confirmed), "the reference must spare some clean request's demotion for this to mean much"
    # answers the reference changed without a flag: not audited before, though enforce changed them
    quiet = backdoored.x_eval[everything.overruled & ~everything.flagged][:4]
    assert len(quiet), "the reference must overrule some unflagged request for this to mean much"
    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, audit_log=str(log)), guard=guard)
    server.start()
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
            answers = {}
            for x, request_id in ((unflagged, "clean-1"), (triggered, "attack-7"), (confirmed, "kept-2"),
                                  (quiet, "overruled-3")):
                tensor = triton.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                answers[request_id] = client.infer("badnets", [tensor], request_id=request_id)
            answer = answers["attack-7"]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            guard_pb2_grpc.GuardStub(channel).Predict(
                guard_pb2.PredictRequest(model="badnets", shape=list(triggered.shape), data=triggered.tobytes()))
        flagged_samples = scrape(server.metrics_port, 'guard_samples_total{model="badnets",verdict="flagged"}')
        overruled_samples = scrape(server.metrics_port, 'guard_overruled_samples_total{model="badnets"}')
        assert scrape(server.metrics_port, 'guard_audit_log_enabled{model="badnets"}') == 1
    finally:
        server.stop(grace=1)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["protocol"], line["request_id"]) for line in lines] == [("oip", "attack-7"), ("oip", "kept-2"),
                                                                          ("oip", "overruled-3"), ("guard.v1", "")]
    oip = lines[0]
    assert oip["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:")) and oip["identity"] is None
    assert oip["model"] == "badnets" and oip["policy"] == "enforce" and oip["samples"] == 8
    flagged = answer.as_numpy("guard_flagged")
    assert [entry["index"] for entry in oip["flagged"]] == np.flatnonzero(flagged).tolist() != []
    labels, scores = answer.as_numpy("logits").argmax(1), answer.as_numpy("guard_score")
    for entry in oip["flagged"]:
        assert entry["label"] == labels[entry["index"]] and entry["score"] == pytest.approx(scores[entry["index"]])
        assert entry["score"] > guard.tau
    assert sum(entry["model_label"] == TARGET for entry in oip["flagged"]) >= len(oip["flagged"]) // 2
    local = guard.predict(triggered)
    for entry in oip["flagged"]:  # why each one was answered as it was
        i = entry["index"]
        assert (entry["demoted"], entry["overruled"], entry["spared"]) == (local.demoted[i], local.overruled[i],
                                                                           local.spared[i])
    kept = lines[1]["flagged"]  # flagged (past the demote threshold), yet answered with the model's own class
    assert [entry["index"] for entry in kept] == list(range(len(confirmed)))
    assert all(entry["spared"] and not entry["demoted"] and entry["label"] == entry["model_label"] for entry in kept)
    changed = lines[2]
    assert changed["flagged"] == [] and [e["index"] for e in changed["overruled_unflagged"]] == list(range(len(quiet)))
    assert all(e["overruled"] and e["label"] != e["model_label"] for e in changed["overruled_unflagged"])
    # the log and the metrics agree
    assert flagged_samples == sum(len(line["flagged"]) for line in lines)
    assert overruled_samples == sum(e["overruled"] for line in lines for e in line["flagged"] + line["overruled_unflagged"])


def test_an_audit_log_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(GuardError, match="cannot open the audit log"):
        AuditLog(str(tmp_path / "no-such-folder" / "audit.jsonl"))


def test_a_request_answered_after_the_log_closed_is_not_failed(tmp_path: Path) -> None:
    """A handler that outlives the server's grace period finds the log closed: its line is dropped (and logged),
    and the caller still gets the answer."""
    from guard.server.audit import Caller

    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    audit.close()
    result = _one_flagged_sample()
    audit.record("badnets", "enforce", Caller("oip", "ipv4:127.0.0.1:1", None, "late"), result)
    assert (tmp_path / "audit.jsonl").read_text() == ""


def test_a_reopen_that_fails_keeps_writing_to_the_open_file(tmp_path: Path) -> None:
    """SIGHUP with the log's folder gone (a rotation gone wrong): no line is lost, the old file takes it."""
    from guard.server.audit import Caller

    folder = tmp_path / "logs"
    folder.mkdir()
    audit = AuditLog(str(folder / "audit.jsonl"))
    moved = folder.rename(tmp_path / "moved")
    audit.reopen()
    result = _one_flagged_sample()
    audit.record("badnets", "enforce", Caller("oip", "ipv4:127.0.0.1:1", None, "after"), result)
    audit.close()
    assert json.loads((moved / "audit.jsonl").read_text())["request_id"] == "after"
    folder.mkdir()
    audit.reopen()  # after close: nothing is opened again
    assert not (folder / "audit.jsonl").exists()


def test_a_reopen_after_a_write_the_disk_refused_does_not_raise(tmp_path: Path) -> None:
    """/dev/full refuses every write: the failed line stays in the old file's buffer, and closing it fails too."""
    from guard.server.audit import Caller

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    audit = AuditLog("/dev/full")
    result = _one_flagged_sample()
    audit.record("badnets", "enforce", Caller("oip", "ipv4:127.0.0.1:1", None, "lost"), result)  # logged, not raised
    audit.reopen()
    audit.close()


def _one_flagged_sample():
    """A result of one sample, flagged: what the log records."""
    from guard.runtime.guard import Result

    flagged = np.array([True])
    return Result(labels=np.array([3]), logits=np.zeros((1, 10), np.float32), flagged=flagged,
                  score=np.array([9.0], np.float32), model_labels=np.array([0]), demoted=~flagged, overruled=~flagged,
                  spared=flagged)


def _caller(request_id: str):
    from guard.server.audit import Caller

    return Caller("oip", "ipv4:127.0.0.1:1", None, request_id)


def test_a_stalled_writer_holds_no_request_and_drops_what_it_cannot_hold(tmp_path: Path, monkeypatch) -> None:
    """Standard output that nobody reads: the pipe fills and the writer blocks, yet every record() returns at once,
    the lines past the queue's bound are dropped and counted, and close() gives up after its timeout."""
    import logging
    import os
    import threading

    from guard.server import audit as audit_module

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("guard.server").addHandler(handler)

    monkeypatch.setattr(audit_module, "MAX_PENDING_BYTES", 64 * 1024)
    read_end, write_end = os.pipe()
    dropped = []
    try:
        audit = AuditLog(f"/proc/self/fd/{write_end}", dropped=lambda: dropped.append(1))
        result = _one_flagged_sample()
        done = threading.Event()

        def record_many() -> None:
            for i in range(3000):  # about 0.9 MB of lines, against a 64 KiB pipe and a 64 KiB queue
                audit.record("badnets", "enforce", _caller(f"r{i}"), result)
            done.set()

        threading.Thread(target=record_many, daemon=True).start()
        assert done.wait(60), "record() blocked behind a stalled write"
        assert 0 < len(dropped) < 3000
        assert sum("cannot write the audit log" in line for line in said) == 1  # once per outage, not per line
        audit.close(timeout=0.5)
        assert any("takes no writes" in line for line in said)
    finally:
        logging.getLogger("guard.server").removeHandler(handler)
        os.close(read_end)  # the writer's blocked write fails now, the rest fail fast, and its thread ends
        audit._writer.join(30)
        os.close(write_end)
    assert not audit._writer.is_alive()


@pytest.mark.parametrize("target", ["file", "-"])
def test_a_line_the_disk_cut_short_does_not_swallow_the_next(tmp_path: Path, monkeypatch, target: str) -> None:
    """A write that stops inside its line (the disk filled mid-line): that line is lost, the next starts on a line of
    its own and parses whole. Standard output too, which went through Python's buffer: the rest of a cut line
    stayed there and the next line was glued to it."""
    import os
    import sys

    path = tmp_path / "audit.jsonl"
    dropped = []
    if target == "-":
        stdout = path.open("w")
        path.chmod(0o600)
        monkeypatch.setattr(sys, "stdout", stdout)
    audit = AuditLog(str(path) if target == "file" else "-", dropped=lambda: dropped.append(1))
    real_write, calls = os.write, []

    def filling_disk(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) in (2, 4):  # each line's second write: the disk is full
            raise OSError(28, "No space left on device")
        # half of the first line; of the second only the newline that ends the first's fragment; then all
        return real_write(fd, data[: len(data) // 2] if len(calls) == 1 else data[:1] if len(calls) == 3 else data)

    monkeypatch.setattr(os, "write", filling_disk)
    result = _one_flagged_sample()
    for request_id in ("cut", "lost", "whole"):
        audit.record("badnets", "enforce", _caller(request_id), result)
    audit.close()
    monkeypatch.undo()
    if target == "-":
        stdout.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and dropped == [1, 1]  # the fragment, then the last line whole: no empty line between
    assert json.loads(lines[1])["request_id"] == "whole"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)  # the lines name callers: the owner's to read


def test_the_writer_outlives_a_line_that_fails_unexpectedly(tmp_path: Path) -> None:
    """Any error while writing one line costs that line (counted), not the writer thread and every line after it."""
    path = tmp_path / "audit.jsonl"
    dropped = []
    audit = AuditLog(str(path), dropped=lambda: dropped.append(1))
    real_emit, failed = audit._emit, []

    def once_broken(data: bytes) -> int:
        if not failed:
            failed.append(1)
            raise RuntimeError("something no one expected")
        return real_emit(data)

    audit._emit = once_broken
    result = _one_flagged_sample()
    for request_id in ("broken", "after"):
        audit.record("badnets", "enforce", _caller(request_id), result)
    audit.close()
    assert dropped == [1] and [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["after"]


def test_a_log_file_moved_away_without_sighup_is_opened_afresh(tmp_path: Path) -> None:
    """Deleted, or renamed by a rotation without postrotate: the lines went on into the moved file, with no drop
    counted and nothing logged."""
    from guard.server.audit import Caller

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    result = _one_flagged_sample()
    audit.record("badnets", "enforce", Caller("oip", "ipv4:127.0.0.1:1", None, "before"), result)
    deadline = time.monotonic() + 10
    while not path.read_text() and time.monotonic() < deadline:  # the writer's thread has written it
        time.sleep(0.05)
    path.rename(tmp_path / "rotated.jsonl")
    audit.record("badnets", "enforce", Caller("oip", "ipv4:127.0.0.1:1", None, "after-rename"), result)
    audit.close()
    assert json.loads((tmp_path / "rotated.jsonl").read_text())["request_id"] == "before"
    assert json.loads(path.read_text())["request_id"] == "after-rename"


def test_standard_output_closed_stops_a_server_that_audits_there(backdoored: Backdoored) -> None:
    """Every line was dropped with a traceback of its own, the server serving on as if it audited."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "guard", "serve", str(backdoored.model_path), "--profile",
                           str(backdoored.profile_path), "--port", "0", "--metrics-port", "0", "--audit-log", "-"],
                          check=False, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1),
                          env={k: v for k, v in os.environ.items() if not k.startswith("GUARD_")})
    assert done.returncode == 2, done.stderr
    assert "guard: error: --audit-log -: standard output is closed; give the audit log a file" in done.stderr


def test_a_start_that_fails_at_the_audit_log_leaves_no_port_or_thread_behind(backdoored: Backdoored,
                                                                           tmp_path: Path) -> None:
    """The metrics port stayed served, and the health server's loop running, behind a start that had failed."""
    import threading

    server = GuardServer(ServeSettings(model=backdoored.model_path, profile=backdoored.profile_path, port=0,
                                       metrics_port=0, health_port=0,
                                       audit_log=str(tmp_path / "no-such-folder" / "audit.jsonl")))
    with pytest.raises(GuardError, match="cannot open the audit log"):
        server.start()
    names = {thread.name for thread in threading.enumerate()}
    assert not names & {"guard-metrics", "guard-metrics-watch", "guard-health"}, names
    server.stop(grace=0)
    with pytest.raises(GuardError, match="a stopped server cannot start again"):
        server.start()
