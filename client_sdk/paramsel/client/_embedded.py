"""The SDK's one seam into the server's code, run in this process.

Three things the SDK does without a round trip use the server's own code: the service itself, run in
this process on the caller's tensors when no target is given (:func:`run_local`, over
``paramsel.server.local``), the embedded loopback server (``target="embedded-grpc"``,
:func:`paramsel.client._target.embedded_target`), and the engine, for what is computed locally - the score functions' scores when called directly, the drifts of a layer selection
the service refuses to make (FL4Health's rules for out-of-range values), and pulls applied straight
into the model's tensors. (A caller's own score function's top-k is the service's: its scores travel
with ``ScoreFunction.SUPPLIED``.) Every function here imports
``paramsel.server`` or ``paramsel.engine`` in its body, when called: ``import paramsel.client`` and the
drop-in classes load neither. No other SDK module imports them (CONTRIBUTING.md, "Layout and dependency
rule"; ``tests/test_dependency_rule.py`` pins both).

Both packages belong to the server's distribution, ``paramsel``, not to this one, ``paramsel-client``,
which depends on nothing of it: with the SDK alone installed, that work raises
:class:`ModuleNotFoundError` naming the missing package, what needed it and how to get it
(:func:`_needs_paramsel`). What the SDK asks a running server for needs neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch too is imported only with the work: `paramsel health` imports this module
    import torch

    from paramsel.client._types import ScoreFunction

    State = Mapping[str, torch.Tensor]
    SparseParts = list[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor]]
    """(name, dense shape, values, flat positions) per tensor: a sparse selection or pull payload."""

PULL_MODES = ("replace", "scatter")
"""The drop-in exchangers' pull modes; :func:`pull_sparse_into` also takes ``"add"`` (sparse updates)."""

SERVER_DISTRIBUTION = "paramsel"
"""The distribution that holds ``paramsel.server`` and ``paramsel.engine`` (server/pyproject.toml)."""


def _version() -> str | None:
    import importlib.metadata  # only on the way to an error: `paramsel health` imports this module

    try:
        return importlib.metadata.version("paramsel-client")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return None


@contextmanager
def _needs_paramsel(work: str, remedy: str = "") -> Iterator[None]:
    """Around the import of ``paramsel.server`` or ``paramsel.engine``: when that package is missing
    (paramsel-client installed without paramsel), a ModuleNotFoundError that says what ``work`` needed
    and how to get it (``remedy``: another way, if any). Any other missing module (torch, say) is raised
    as it is."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name not in ("paramsel.server", "paramsel.engine"):
            raise
        version = _version()
        wanted = f"{SERVER_DISTRIBUTION}=={version}" if version else SERVER_DISTRIBUTION
        raise ModuleNotFoundError(
            f"{work} needs {error.name}, which the {SERVER_DISTRIBUTION!r} distribution provides; only the "
            f"SDK (paramsel-client) is installed here. Install the server's distribution beside it, at the "
            f"same version (`pip install '{wanted}'`; from a checkout, `pip install ./server`){remedy}.",
            name=error.name,
        ) from error


def start_server() -> Any:
    """A loopback server on a free port, without reflection (the caller stops it)."""
    with _needs_paramsel(
        'The embedded server (target="embedded-grpc")', ", or give the SDK a running server's address"
    ):
        from paramsel.server import create_server
        from paramsel.server.local import EMBEDDED_CONFIG

    return create_server(EMBEDDED_CONFIG)


_KEEPS_MEMORY = frozenset({"select", "push", "pull", "aggregate"})
"""The rpcs of :func:`run_local` whose memory is kept for the next call (:mod:`paramsel.client._memory`)."""


def run_local(rpc: str, *args: Any, **kwargs: Any) -> Any:
    """The rpc ``rpc`` (a function of ``paramsel.server.local``: select, push, pull, aggregate,
    server_info) run in this process; what the service refuses raises the :class:`ParamselError` the
    service answers with (same status, message and reason), through the server's own table
    (``paramsel.server.status.status_of``). Any other exception (a bug) is raised as it is."""
    with _needs_paramsel(
        "The service run in this process (no target= or connection= given, and no $PARAMSEL_TARGET set)",
        ", or give the SDK a running server's address",
    ):
        from paramsel.server import local
        from paramsel.server.status import status_of

    from paramsel.client._errors import ParamselError, StatusCode
    from paramsel.client._memory import kept_memory

    try:
        with kept_memory() if rpc in _KEEPS_MEMORY else nullcontext():
            return getattr(local, rpc)(*args, **kwargs)
    except ParamselError:
        raise
    except Exception as error:
        code = status_of(error)
        if code is None:
            raise
        raise ParamselError(StatusCode(code.value[0]), str(error), getattr(error, "reason", None)) from None


def score_tensors(kind: ScoreFunction, current: State, initial: State | None) -> dict[str, torch.Tensor]:
    """The scores of one of FL4Health's six score functions, as the server computes them."""
    with _needs_paramsel(f"{kind.name.lower()}_scores, called in this process,"):
        import paramsel.engine as engine

    return engine.score_tensors(engine.ScoreFunction[kind.name], current, initial)


def drift_norms(current: State, initial: State | None, *, normalize: bool, what: str) -> dict[str, float]:
    """Each layer's drift from the initial model; FailedPrecondition (``what`` needs it) without one."""
    with _needs_paramsel(f"{what} with values the service refuses, made in this process,"):
        import paramsel.engine as engine

    if initial is None:
        raise engine.FailedPrecondition(f"{what} needs the initial model, but none was given")
    return engine.drift_norms(current, initial, normalize=normalize)


def pull_sparse_into(targets: State, payload: SparseParts, *, mode: str) -> None:
    """Writes the densified sparse tensors into ``targets`` (``mode``: one of :data:`PULL_MODES`), or
    adds them to it (``"add"``)."""
    with _needs_paramsel("A pull, applied to the model in this process,"):
        import paramsel.engine as engine

    pull_mode = {
        "replace": engine.PullMode.REPLACE,
        "scatter": engine.PullMode.SCATTER,
        "add": engine.PullMode.ADD,
    }[mode]
    sparse = [
        engine.SparseTensor(name, shape, values, positions) for name, shape, values, positions in payload
    ]
    engine.pull_sparse_into(targets, sparse, mode=pull_mode)


def replace_coo_into(targets: State, payload: SparseParts) -> bool:
    """A replace pull of FL4Health's (nnz, ndim) coordinates (the last of each part) by the engine's
    native module; False, with nothing written, when it is not built or declines (then flatten and call
    :func:`pull_sparse_into`)."""
    with _needs_paramsel("A pull, applied to the model in this process,"):
        import paramsel.engine as engine

    return engine.replace_coo_into(targets, [engine.CooTensor(*part) for part in payload])


def pull_layers(model: State, payload: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole layers, cast to the model's dtypes (checked against its names and shapes)."""
    with _needs_paramsel("A pull, applied to the model in this process,"):
        import paramsel.engine as engine

    return engine.pull_layers(_specs(model), payload)


def pull_fedpm(model: State, payload: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedPM probabilities back through the inverse sigmoid, cast to the model's dtypes."""
    with _needs_paramsel("A FedPM pull, applied to the model in this process,"):
        import paramsel.engine as engine

    return engine.pull_fedpm(_specs(model), payload)


def _specs(model: State) -> list[Any]:
    import paramsel.engine as engine  # loaded already: only the pulls above call this

    return [engine.TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in model.items()]
