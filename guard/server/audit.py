"""The audit log (opt-in, `--audit-log`): one JSON line per answered request in which guard flagged a sample, the
reference overruled one (an answer changed without a flag), or guard answered unguarded, naming the caller. Metrics count such requests but carry no caller or request id (their
labels stay low-cardinality), so a security team asking who sent what looked like triggers reads it here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import grpc
import numpy as np

from guard.errors import GuardError
from guard.runtime.guard import Result

log = logging.getLogger("guard.server")
MAX_ID_CHARS = 256  # a request id is the caller's text: kept, but not at any length


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as far as the server can tell."""

    protocol: str  # "oip" or "guard.v1"
    peer: str  # gRPC's peer address, e.g. ipv4:10.0.0.7:51234
    identity: str | None  # the client certificate's name, under mutual TLS (IDENTITY_PROPERTIES)
    request_id: str  # the OIP request's `id` ("" where none was sent; guard.v1 has none)


# Where a client certificate names its holder, first found first: its common name, else (a certificate with only
# subject alternative names, as SPIFFE issues) its SPIFFE id, its first alternative name, its whole subject.
IDENTITY_PROPERTIES = ("x509_common_name", "peer_spiffe_id", "x509_subject_alternative_name", "x509_subject")


def caller_of(context: grpc.ServicerContext, protocol: str, request_id: str = "") -> Caller:
    auth = context.auth_context()
    names = [name for key in IDENTITY_PROPERTIES for name in auth.get(key) or [] if name]
    identity = names[0].decode("utf-8", errors="replace") if names else None
    return Caller(protocol, context.peer(), identity, request_id[:MAX_ID_CHARS])


# Lines waiting for the writer, at most: past this the writer is stuck (a log pipe nobody reads, a hung mount), and a
# line is dropped and counted rather than held in memory or waited for in the request path.
MAX_PENDING_BYTES = 64 * 2**20
CLOSE_TIMEOUT_SECONDS = 5.0  # how long a stopping server waits for the writer to empty its queue
_REOPEN = b""  # the queue's marker: reopen the path here, after the lines recorded before the SIGHUP


class AuditLog:
    """Appends the lines to a file (`-`: standard output), each written whole, from a thread of its own.

    A request only queues its line: a write that blocks (standard output that nobody reads, a stalled disk) must not
    hold the request, its `--max-inflight` place or the server's shutdown. A line the queue has no room for, or that
    the disk refused, is dropped, counted (`dropped`, the metric guard_audit_lines_dropped_total) and logged once
    per outage."""

    def __init__(self, target: str, dropped: Callable[[], None] | None = None) -> None:
        self.target = target
        self._dropped = dropped or (lambda: None)
        self._opened: os.stat_result | None = None  # the path's file when it was opened (not for standard output)
        self._fd = _stdout_fd() if target == "-" else self._open()
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._changed = threading.Condition()
        self._closed = False
        self._failing = False  # inside an outage: said once, not per line
        self._torn = False  # the last write stopped inside its line: the next starts on a line of its own
        self._stale = False  # the path moved away and could not be opened afresh: not tried again per line
        self._writer = threading.Thread(target=self._write_lines, name="guard-audit", daemon=True)
        self._writer.start()

    def _open(self) -> int:
        """The path opened for appending, readable by its owner only (the lines name callers); what the path
        was then is kept, to tell when it is moved away."""
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise GuardError(f"cannot open the audit log {self.target}: {exc}") from None
        try:
            self._opened = os.stat(self.target)
        except OSError:  # moved away already: it is found moved at the first line
            self._opened = None
        return fd

    def record(self, model: str, policy: str, caller: Caller, result: Result) -> None:
        flagged = np.flatnonzero(result.flagged)
        overruled = np.flatnonzero(result.overruled & ~result.flagged)  # answers changed without a flag
        if not flagged.size and not overruled.size and not result.unchecked:
            return

        def sample(i: int) -> dict[str, object]:
            return {"index": int(i), "score": _number(result.score[i]), "model_label": int(result.model_labels[i]),
                    "label": int(result.labels[i]), "demoted": bool(result.demoted[i]),
                    "overruled": bool(result.overruled[i]), "spared": bool(result.spared[i])}

        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "model": model,
            "protocol": caller.protocol, "request_id": caller.request_id, "peer": caller.peer,
            "identity": caller.identity, "policy": policy, "samples": len(result.labels),
            "unchecked": result.unchecked, "flagged": [sample(i) for i in flagged],
            "overruled_unflagged": [sample(i) for i in overruled],
        }
        data = (json.dumps(line) + "\n").encode()
        with self._changed:  # nothing under this lock can block: logging goes to stderr, which may be stuck too
            closed, behind = self._closed, self._pending_bytes
            queued = not closed and behind + len(data) <= MAX_PENDING_BYTES and self._writer.is_alive()
            if queued:
                self._pending.append(data)
                self._pending_bytes += len(data)
                self._changed.notify()
        if closed:  # a handler that outlived the server's grace period: nowhere left to write
            log.error("audit log closed; not recorded: %s", data.decode().strip())
        elif not queued:
            self._drop(f"{behind} bytes wait for a write that does not finish" if self._writer.is_alive() else
                       "its writer thread has stopped")

    def reopen(self) -> None:
        """Open `target` afresh (on SIGHUP, after logrotate moved the file away), so that no line is appended to a
        file that has been rotated out; the lines written before go to the old one (a line still queued when the
        file was moved goes to the new one: the writer finds the path moved and opens it afresh). Where the new file cannot be
        opened, the lines go on to the old one."""
        if self.target == "-":
            return
        with self._changed:
            if not self._closed:
                self._pending.append(_REOPEN)
                self._changed.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Write what is queued and close the file, waiting at most `timeout` seconds for a stalled writer."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify()
        self._writer.join(timeout)
        if self._writer.is_alive():
            with self._changed:
                unwritten = sum(1 for data in self._pending if data)
            log.error("the audit log %s takes no writes; %d line(s) not written", self.target, unwritten)

    def _write_lines(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    break
                data = self._pending.popleft()
                self._pending_bytes -= len(data)
            try:
                if data == _REOPEN:
                    self._reopen()
                else:
                    self._write(data)
            except Exception:  # the writer must outlive any one line; a lost line is counted
                log.exception("audit log %s: writing a line failed", self.target)
                self._dropped()
        if self.target != "-":
            os.close(self._fd)

    def _write(self, data: bytes) -> None:
        # Deleted or renamed without the SIGHUP: the lines went on into a file nobody would read. Reopened once per
        # move; where the path cannot be opened, the lines go on to the open file until it can (and a SIGHUP).
        if self.target != "-" and not self._stale and self._moved():
            log.warning("the audit log %s was moved or deleted without SIGHUP; opening the path afresh", self.target)
            self._stale = not self._reopen()
        ending = b"\n" if self._torn else b""  # ends the fragment the last failed write left
        data = ending + data
        written = 0
        try:
            while written < len(data):
                written += self._emit(data[written:])
        except (OSError, ValueError) as exc:  # a full disk, a closed stdout: not the caller's to pay for
            self._torn = written != len(ending)  # a fragment is open unless exactly the ending went out
            self._drop(str(exc))
            return
        self._torn = False
        if self._failing and not self._pending:  # the outage is over once the writer has caught up
            log.info("the audit log %s takes writes again", self.target)
            self._failing = False

    def _emit(self, data: bytes) -> int:
        """Write some of `data` to the file descriptor, unbuffered (standard output's too: Python's buffer kept the
        rest of a line a full disk cut short, and glued the next line to it), so that nothing of a failed line
        lingers to join the next one."""
        return os.write(self._fd, data)

    def _moved(self) -> bool:
        """The path is no longer the file opened (compared path to path: on some file systems, overlayfs among them,
        a file's stat and its descriptor's fstat differ)."""
        try:
            now = os.stat(self.target)
        except OSError:
            return True
        return self._opened is None or (now.st_dev, now.st_ino) != (self._opened.st_dev, self._opened.st_ino)

    def _reopen(self) -> bool:
        try:
            fresh = self._open()
        except GuardError as exc:
            log.error("%s; writing on to the file already open", exc)
            return False
        os.close(self._fd)
        self._fd, self._torn, self._stale = fresh, False, False
        log.info("audit log %s reopened", self.target)
        return True

    def _drop(self, reason: str) -> None:
        self._dropped()
        if not self._failing:
            log.error("cannot write the audit log %s: %s; answering on, unaudited (guard_audit_lines_dropped_total "
                      "counts the lines lost)", self.target, reason)
        self._failing = True


def _stdout_fd() -> int:
    """Standard output's file descriptor (sys.stdout's, else 1), after what Python buffered for it; a GuardError
    where it is closed (every line would have been dropped, each with a traceback). Python sets sys.stdout to None
    where descriptor 1 was closed when it started: a file opened since may hold that number, so 1 is not used then."""
    closed = GuardError("--audit-log -: standard output is closed; give the audit log a file")
    if sys.stdout is None:
        raise closed
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no file behind it (replaced by a program that embeds guard): the process's own
        fd = 1
    try:
        os.fstat(fd)
    except OSError:
        raise closed from None
    return fd


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
