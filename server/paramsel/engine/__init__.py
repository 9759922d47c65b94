"""paramsel's pure computation engine: FL4Health 0.4.2's parameter selection on name -> tensor maps.

It imports only torch, numpy and the standard library; the gRPC servicer decodes requests into these
calls and maps :class:`EngineError` subclasses to status codes.
"""

from .aggregate import Contribution, aggregate_layers, aggregate_sparse
from .errors import EngineError, FailedPrecondition, InvalidArgument
from .fedpm import sample_fedpm_masks
from .layers import LayerResult, drift_norms, select_layers_by_percentage, select_layers_by_threshold
from .per_coordinate import aggregate_per_coordinate
from .pull import (
    CooTensor,
    PullMode,
    pull_fedpm,
    pull_layers,
    pull_sparse,
    pull_sparse_into,
    replace_coo_into,
)
from .random_k import PositionDraw, SparseUpdateResult, select_random_k
from .rounding import round_float
from .scores import ScoreFunction, score_tensors
from .state import State, TensorSpec, check_same_layout
from .topk import SparseTensor, TopKResult, select_top_k, select_top_k_by_scores
from .updates import UpdateSelection, select_sparse_update

__all__ = [
    "Contribution",
    "CooTensor",
    "EngineError",
    "FailedPrecondition",
    "InvalidArgument",
    "LayerResult",
    "PositionDraw",
    "PullMode",
    "ScoreFunction",
    "SparseTensor",
    "SparseUpdateResult",
    "State",
    "TensorSpec",
    "TopKResult",
    "UpdateSelection",
    "aggregate_layers",
    "aggregate_per_coordinate",
    "aggregate_sparse",
    "check_same_layout",
    "drift_norms",
    "pull_fedpm",
    "pull_layers",
    "pull_sparse",
    "pull_sparse_into",
    "replace_coo_into",
    "round_float",
    "sample_fedpm_masks",
    "score_tensors",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "select_random_k",
    "select_sparse_update",
    "select_top_k",
    "select_top_k_by_scores",
]
