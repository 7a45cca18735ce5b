"""guard: an inference-time backdoor guard.

Offline, `calibrate` turns a model and a few hundred clean samples into a `Profile`; online, `Guard` runs the model
restricted to its benign neurons and checks every request for the activation pattern of a trigger.
"""

from guard._version import __version__
from guard.calibrate.pipeline import calibrate
from guard.calibrate.profile import Profile
from guard.runtime.guard import Guard, Result

__all__ = ["Guard", "Profile", "Result", "calibrate", "__version__"]
