"""guard: an inference-time backdoor guard.

Offline, `guard.calibrate.pipeline.calibrate` turns a model and a few hundred clean samples into a `Profile`; online,
`Guard` runs the model restricted to its benign neurons and checks every request for the activation pattern of a
trigger. Names are imported on first use, so `import guard.server` or the CLI does not pay for torch until it needs
it. (`calibrate` is not one of them: `guard.calibrate` is the subpackage, and importing any of it puts the package
under that name.)
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import TYPE_CHECKING, Any

from guard._version import __version__

# ONNX Runtime (1.2x) reports usage to Microsoft's collector and keeps a device id under ~/.cache unless this is set
# before it starts; a security sidecar sends nothing out of its pod unasked. A value the caller set stands.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from guard.calibrate.profile import Profile
    from guard.runtime.guard import Guard, Result

_LAZY = {
    "Profile": "guard.calibrate.profile",
    "Guard": "guard.runtime.guard",
    "Result": "guard.runtime.guard",
}

__all__ = ["Guard", "Profile", "Result", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'guard' has no attribute {name!r}")
