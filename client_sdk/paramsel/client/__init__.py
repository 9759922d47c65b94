"""paramsel's drop-in client: FL4Health's parameter exchangers, served by a paramsel server.

Swap the imports of an FL4Health client::

    from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

and keep the rest. Calls go to ``target=`` (or ``connection=Connection(...)``: TLS, bearer token,
deadline, retries) if given, else to ``$PARAMSEL_TARGET``, else to a server embedded in this process
(started on first use). Failures raise :class:`ParamselError`.
"""

from paramsel.client._aggregate import aggregate_layers, aggregate_sparse_coo
from paramsel.client._client import AggregateResult, Client, PushResult, SelectResult
from paramsel.client._compact import pack_compact, unpack_compact
from paramsel.client._connection import Connection
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
from paramsel.client._errors import ParamselError, StatusCode
from paramsel.client._exchangers import DynamicLayerExchanger, FedPmExchanger, SparseCooParameterExchanger
from paramsel.client._target import ENV_TARGET

__all__ = [
    "ENV_TARGET",
    "AggregateResult",
    "Client",
    "Connection",
    "DynamicLayerExchanger",
    "FedPmExchanger",
    "LayerSelectionFunction",
    "LayerSelectionFunctionConstructor",
    "ParamselError",
    "PushResult",
    "SelectResult",
    "SparseCooParameterExchanger",
    "StatusCode",
    "aggregate_layers",
    "aggregate_sparse_coo",
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
]
