"""paramsel's drop-in client: FL4Health's parameter exchangers, served by a paramsel server.

Swap the imports of an FL4Health client::

    from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

and keep the rest. Calls go to ``target=`` (or ``connection=Connection(...)``: TLS, bearer token,
deadline, retries) if given, else to ``$PARAMSEL_TARGET``; with neither, the service's own code runs in
this process, on the model's tensors (no gRPC; ``target="embedded-grpc"`` starts a loopback server in
this process instead). Failures raise :class:`ParamselError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Imported with the package: none of them needs torch, so that `paramsel health` (which connects the
# way the SDK does) starts fast. Everything else is imported from its module on first use (PEP 562).
from paramsel.client._connection import Connection
from paramsel.client._errors import InvalidArgumentError, ParamselError, StatusCode
from paramsel.client._target import ENV_TARGET
from paramsel.wire.lazy import lazy_exports

if TYPE_CHECKING:
    from paramsel.client._aggregate import aggregate_layers, aggregate_sparse_coo
    from paramsel.client._client import AggregateResult, Client, PushResult, SelectResult, SparseTensor
    from paramsel.client._compact import pack_compact, unpack_compact, unpack_masks
    from paramsel.client._criteria import (
        LayerSelectionFunction,
        LayerSelectionFunctionConstructor,
        largest_final_magnitude_scores,
        largest_increase_in_magnitude_scores,
        largest_magnitude_change_scores,
        select_layers_by_percentage,
        select_layers_by_threshold,
        select_scores_and_sample_masks,
        smallest_final_magnitude_scores,
        smallest_increase_in_magnitude_scores,
        smallest_magnitude_change_scores,
    )
    from paramsel.client._exchangers import DynamicLayerExchanger, FedPmExchanger, SparseCooParameterExchanger
    from paramsel.client._types import (
        AggregateHeader,
        Averaging,
        Criterion,
        DataType,
        DriftPercentage,
        DriftThreshold,
        FedPm,
        LayerSummary,
        PayloadKind,
        PositionEncoding,
        PullMode,
        ScoreFunction,
        SelectionHeader,
        SelectionKind,
        ServerInfo,
        SparseUpdate,
        TopK,
        TopKSummary,
        UpdateSelection,
    )
    from paramsel.client._updates import SparseUpdateExchanger, aggregate_updates

__all__ = [
    "ENV_TARGET",
    "AggregateHeader",
    "AggregateResult",
    "Averaging",
    "Client",
    "Connection",
    "Criterion",
    "DataType",
    "DriftPercentage",
    "DriftThreshold",
    "DynamicLayerExchanger",
    "FedPm",
    "FedPmExchanger",
    "InvalidArgumentError",
    "LayerSelectionFunction",
    "LayerSelectionFunctionConstructor",
    "LayerSummary",
    "ParamselError",
    "PayloadKind",
    "PositionEncoding",
    "PullMode",
    "PushResult",
    "ScoreFunction",
    "SelectResult",
    "SelectionHeader",
    "SelectionKind",
    "ServerInfo",
    "SparseCooParameterExchanger",
    "SparseTensor",
    "SparseUpdate",
    "SparseUpdateExchanger",
    "StatusCode",
    "TopK",
    "TopKSummary",
    "UpdateSelection",
    "aggregate_layers",
    "aggregate_sparse_coo",
    "aggregate_updates",
    "largest_final_magnitude_scores",
    "largest_increase_in_magnitude_scores",
    "largest_magnitude_change_scores",
    "pack_compact",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "select_scores_and_sample_masks",
    "smallest_final_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
    "smallest_magnitude_change_scores",
    "unpack_compact",
    "unpack_masks",
]

# Each lazily imported name, and the module that defines it.
_LAZY = {
    **dict.fromkeys(("aggregate_layers", "aggregate_sparse_coo"), "paramsel.client._aggregate"),
    **dict.fromkeys(
        ("AggregateResult", "Client", "PushResult", "SelectResult", "SparseTensor"), "paramsel.client._client"
    ),
    **dict.fromkeys(
        (
            "AggregateHeader",
            "Averaging",
            "Criterion",
            "DataType",
            "DriftPercentage",
            "DriftThreshold",
            "FedPm",
            "LayerSummary",
            "PayloadKind",
            "PositionEncoding",
            "PullMode",
            "ScoreFunction",
            "SelectionHeader",
            "SelectionKind",
            "ServerInfo",
            "SparseUpdate",
            "TopK",
            "TopKSummary",
            "UpdateSelection",
        ),
        "paramsel.client._types",
    ),
    **dict.fromkeys(("pack_compact", "unpack_compact", "unpack_masks"), "paramsel.client._compact"),
    **dict.fromkeys(("SparseUpdateExchanger", "aggregate_updates"), "paramsel.client._updates"),
    **dict.fromkeys(
        (
            "LayerSelectionFunction",
            "LayerSelectionFunctionConstructor",
            "largest_final_magnitude_scores",
            "largest_increase_in_magnitude_scores",
            "largest_magnitude_change_scores",
            "select_layers_by_percentage",
            "select_layers_by_threshold",
            "select_scores_and_sample_masks",
            "smallest_final_magnitude_scores",
            "smallest_increase_in_magnitude_scores",
            "smallest_magnitude_change_scores",
        ),
        "paramsel.client._criteria",
    ),
    **dict.fromkeys(
        ("DynamicLayerExchanger", "FedPmExchanger", "SparseCooParameterExchanger"),
        "paramsel.client._exchangers",
    ),
}

_getattr, __dir__ = lazy_exports(__name__, globals(), _LAZY)
if not TYPE_CHECKING:  # type checkers see the imports above; a misspelt name stays an error for them
    __getattr__ = _getattr
