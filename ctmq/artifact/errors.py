"""The artifact's error type (its own module: every part of ctmq.artifact raises it)."""


class ArtifactError(ValueError):
    """A file that is not a valid, intact ctmq artifact; the message says why."""
