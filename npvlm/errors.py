"""Error types that npvlm raises on bad input.

Every error a user can cause (a broken model folder, a bad image, a bad option) is one of these,
so the CLI can print one line and exit non-zero instead of a traceback.
"""


class NpvlmError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class ConfigError(NpvlmError, ValueError):
    """config.json is missing, unreadable, or cannot describe a PaliGemma model."""


class CheckpointError(NpvlmError, ValueError):
    """The weight files are missing, malformed, or do not match the config."""


class InputError(NpvlmError, ValueError):
    """A prompt, image or generation option that npvlm cannot use."""


class BackendError(NpvlmError, RuntimeError):
    """The requested array backend is unknown or not usable on this machine."""


def error_line(e):
    """What a command prints for an exception: `error: ...` for bad input, `internal error
    (Type): ...` for anything else (a bug), the first line only."""
    kind = "error" if isinstance(e, NpvlmError) else f"internal error ({type(e).__name__})"
    return f"{kind}: {e}".splitlines()[0] if str(e) else kind
