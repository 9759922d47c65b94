"""The public surface of paramsel.client is a promise: changing it must be deliberate."""

from __future__ import annotations

import paramsel.client


def test_public_exports_are_pinned() -> None:
    assert sorted(paramsel.client.__all__) == [
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
        "ENV_TARGET",
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
    for name in paramsel.client.__all__:
        value = getattr(paramsel.client, name)
        if callable(value):
            assert value.__doc__, f"{name} has no docstring"
