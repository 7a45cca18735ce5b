"""Warnings a caller can cause at will, logged sparsely: one line per interval and kind, with a count of the rest."""

from __future__ import annotations

import logging
import math
import threading
import time


class SparseLog:
    """A warning logged at most once per `seconds` and kind, each line saying how many of its kind were left out
    since the last: 300 requests past their check budget in half a second wrote 300 lines. Kinds apart, so that a
    caller failing checks at will does not hide another failure's line."""

    def __init__(self, seconds: float, logger: logging.Logger) -> None:
        self._seconds = seconds
        self._logger = logger
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last.get(kind, -math.inf) < self._seconds:
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return
            left_out, self._last[kind] = self._left_out.pop(kind, 0), now
        more = f" ({left_out} more since the last such line)" if left_out else ""
        self._logger.warning(message + more, *args)
