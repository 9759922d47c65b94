"""Typed domain errors.

The engine knows nothing of gRPC; the servicer maps each class to one status code in one table.
"""


class EngineError(Exception):
    """Base of every error the engine raises on purpose; anything else escaping it is a bug."""


class InvalidArgument(EngineError):  # noqa: N818 - named after the gRPC status it maps to
    """The request is malformed: a value out of range, or a tensor whose name, shape or dtype is wrong.

    The message names the offending field or tensor so that a remote caller can fix the request.
    """


class FailedPrecondition(EngineError):  # noqa: N818 - named after the gRPC status it maps to
    """The request is well formed but cannot be served as asked, e.g. a criterion that compares
    against the initial model when no initial model was given."""
