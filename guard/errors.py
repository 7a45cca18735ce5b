"""The errors guard raises on purpose, so that callers (CLI, server) can turn them into clear messages."""

SHOWN_CHARS = 100  # of a caller's string in an error message: enough to recognise it


def shown(value: object) -> str:
    """`repr(value)`, cut to SHOWN_CHARS: a caller's string quoted back in full could outgrow gRPC's limit on a
    status message's metadata (8 KiB), which then reaches the caller as RESOURCE_EXHAUSTED instead of its error."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


class GuardError(Exception):
    """Base class: a problem with the user's input or files, reported without a traceback."""


class ProfileError(GuardError):
    """The profile is missing, corrupt, or does not belong to the model it is loaded with."""


class ModelError(GuardError):
    """The model cannot be loaded, or uses something guard cannot handle."""


class UnsupportedOpError(ModelError):
    """The ONNX graph uses an operator the torch bridge does not implement."""


class RequestError(GuardError):
    """A request is malformed: wrong shape, dtype, size, or values."""


class UnavailableError(GuardError):
    """The server cannot take the request now (it is shutting down); the caller may retry elsewhere."""


class DeadlineExceededError(GuardError):
    """The caller's deadline passed before the request was computed; it is dropped, not run."""


class OverloadedError(GuardError):
    """The server already holds as many requests as it may (--max-inflight); this one is refused at once."""


class CallerGoneError(GuardError):
    """The call ended (cancelled by its caller, past its deadline, or cut off by the server's shutdown) before its
    answer: what was computed for it is dropped, not counted as answered."""


class CheckFailedError(UnavailableError):
    """The guard could not check the request (its run failed or overran its budget) and fails closed."""
