"""The SDK's one seam into the server's code, run in this process.

Two things the SDK does without a round trip use the server's own code: the embedded server (the
target of last resort, :func:`paramsel.client._target.embedded_target`), and the engine, for what is
computed locally - the score functions' scores when called directly, the drifts of a layer selection
the service refuses to make (FL4Health's rules for out-of-range values), and pulls applied straight
into the model's tensors. (A caller's own score function's top-k is the service's: its scores travel
with ``ScoreFunction.SUPPLIED``.) Every function here imports
``paramsel.server`` or ``paramsel.engine`` in its body, when called: ``import paramsel.client`` and the
drop-in classes load neither. No other SDK module imports them (CONTRIBUTING.md, "Layout and dependency
rule"; ``tests/test_dependency_rule.py`` pins both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch too is imported only with the work: `paramsel health` imports this module
    import torch

    from paramsel.client._types import ScoreFunction

    State = Mapping[str, torch.Tensor]
    SparseParts = list[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor]]
    """(name, dense shape, values, flat positions) per tensor: a sparse selection or pull payload."""

PULL_MODES = ("replace", "scatter")
"""The drop-in exchangers' pull modes; :func:`pull_sparse_into` also takes ``"add"`` (sparse updates)."""


def start_server() -> Any:
    """A loopback server on a free port, without reflection (the caller stops it)."""
    from paramsel.server import ServerConfig, create_server

    return create_server(ServerConfig(host="127.0.0.1", port=0, reflection=False))


def score_tensors(kind: ScoreFunction, current: State, initial: State | None) -> dict[str, torch.Tensor]:
    """The scores of one of FL4Health's six score functions, as the server computes them."""
    from paramsel import engine

    return engine.score_tensors(engine.ScoreFunction[kind.name], current, initial)


def drift_norms(current: State, initial: State | None, *, normalize: bool, what: str) -> dict[str, float]:
    """Each layer's drift from the initial model; FailedPrecondition (``what`` needs it) without one."""
    from paramsel import engine

    if initial is None:
        raise engine.FailedPrecondition(f"{what} needs the initial model, but none was given")
    return engine.drift_norms(current, initial, normalize=normalize)


def pull_sparse_into(targets: State, payload: SparseParts, *, mode: str) -> None:
    """Writes the densified sparse tensors into ``targets`` (``mode``: one of :data:`PULL_MODES`), or
    adds them to it (``"add"``)."""
    from paramsel import engine

    pull_mode = {
        "replace": engine.PullMode.REPLACE,
        "scatter": engine.PullMode.SCATTER,
        "add": engine.PullMode.ADD,
    }[mode]
    sparse = [
        engine.SparseTensor(name, shape, values, positions) for name, shape, values, positions in payload
    ]
    engine.pull_sparse_into(targets, sparse, mode=pull_mode)


def pull_layers(model: State, payload: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole layers, cast to the model's dtypes (checked against its names and shapes)."""
    from paramsel import engine

    return engine.pull_layers(_specs(model), payload)


def pull_fedpm(model: State, payload: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedPM probabilities back through the inverse sigmoid, cast to the model's dtypes."""
    from paramsel import engine

    return engine.pull_fedpm(_specs(model), payload)


def _specs(model: State) -> list[Any]:
    from paramsel import engine

    return [engine.TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in model.items()]
