"""Errors of the SecAgg+ package."""


class SecAggError(RuntimeError):
    """A secure-aggregation round cannot complete; the message says why."""


class SecAggProtocolError(SecAggError):
    """A participant received a request an honest run never sends (or lacks the state for it)."""
