"""Errors for frames that do not follow the contract in proto/paramsel/v1."""


class WireError(ValueError):
    """A frame is malformed: the server answers INVALID_ARGUMENT with this message."""


class WireLimitError(WireError):
    """A call declares more than the receiver accepts: the server answers RESOURCE_EXHAUSTED."""


class StreamEndedError(WireError):
    """The stream ended before everything it declared had arrived (INVALID_ARGUMENT).

    A receiver cannot always tell this from a sender that went away: gRPC may end a cancelled call's
    request stream before it reports the cancellation.
    """
