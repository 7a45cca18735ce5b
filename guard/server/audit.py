"""The audit log (opt-in, `--audit-log`): one JSON line per answered request in which guard flagged a sample or
answered unguarded, naming the caller. Metrics count such requests but carry no caller or request id (their
labels stay low-cardinality), so a security team asking who sent what looked like triggers reads it here.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

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
    identity: str | None  # the client certificate's common name, under mutual TLS
    request_id: str  # the OIP request's `id` ("" where none was sent; guard.v1 has none)


def caller_of(context: grpc.ServicerContext, protocol: str, request_id: str = "") -> Caller:
    names = context.auth_context().get("x509_common_name") or []
    identity = names[0].decode("utf-8", errors="replace") if names else None
    return Caller(protocol, context.peer(), identity, request_id[:MAX_ID_CHARS])


class AuditLog:
    """Appends the lines to a file (`-`: standard output), each written whole and flushed at once."""

    def __init__(self, target: str) -> None:
        self.target = target
        try:
            self._file: TextIO = sys.stdout if target == "-" else open(target, "a", encoding="utf-8")
        except OSError as exc:
            raise GuardError(f"cannot open the audit log {target}: {exc}") from None
        self._lock = threading.Lock()
        self._failing = False
        self._closed = False

    def record(self, model: str, policy: str, caller: Caller, result: Result) -> None:
        flagged = np.flatnonzero(result.flagged)
        if not flagged.size and not result.unchecked:
            return
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "model": model,
            "protocol": caller.protocol, "request_id": caller.request_id, "peer": caller.peer,
            "identity": caller.identity, "policy": policy, "samples": len(result.labels),
            "unchecked": result.unchecked,
            "flagged": [{"index": int(i), "score": _number(result.score[i]), "model_label": int(result.model_labels[i]),
                         "label": int(result.labels[i]), "demoted": bool(result.demoted[i]),
                         "overruled": bool(result.overruled[i]), "spared": bool(result.spared[i])} for i in flagged],
        }
        text = json.dumps(line) + "\n"
        with self._lock:
            if self._closed:  # a handler that outlived the server's grace period: nowhere left to write
                log.error("audit log closed; not recorded: %s", text.strip())
                return
            try:
                self._file.write(text)
                self._file.flush()
                self._failing = False
            except OSError as exc:  # a full disk must not cost the caller its answer; say so once per outage
                if not self._failing:
                    log.error("cannot write the audit log %s: %s; answering on, unaudited", self.target, exc)
                self._failing = True

    def reopen(self) -> None:
        """Open `target` afresh (on SIGHUP, after logrotate moved the file away), so that no line is appended to a
        file that has been rotated out. Where the new file cannot be opened, the lines go on to the old one."""
        if self.target == "-" or self._closed:
            return
        try:
            fresh = open(self.target, "a", encoding="utf-8")
        except OSError as exc:
            log.error("cannot reopen the audit log %s: %s; writing on to the file already open", self.target, exc)
            return
        with self._lock:
            if self._closed:
                fresh.close()
                return
            rotated, self._file = self._file, fresh
        try:
            rotated.close()
        except OSError as exc:  # its buffer held a line a full disk refused: lost already, and logged then
            log.error("closing the rotated audit log %s: %s", self.target, exc)
        log.info("audit log %s reopened", self.target)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not sys.stdout:
                self._file.close()


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
