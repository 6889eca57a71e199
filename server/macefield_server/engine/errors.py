"""Errors of reading checkpoints (a module of their own: the contraction basis check raises them while loading)."""


class CheckpointError(ValueError):
    """A checkpoint could not be read (corrupt, truncated, wrong kind, or contradicting its architecture)."""


class UntrustedPickleError(CheckpointError):
    """A pickled checkpoint was offered without ``trust_pickle=True``."""
