"""The engine's public surface, and the promise that it stays free of gRPC and protobuf."""

import ast
import sys
from pathlib import Path

import paramsel.engine as engine

ENGINE_DIR = Path(engine.__file__).parent


def test_public_names_are_pinned() -> None:
    assert sorted(engine.__all__) == [
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
    for name in engine.__all__:
        assert hasattr(engine, name)


def test_errors_share_one_base() -> None:
    assert issubclass(engine.InvalidArgument, engine.EngineError)
    assert issubclass(engine.FailedPrecondition, engine.EngineError)


def test_engine_imports_only_torch_numpy_and_the_stdlib() -> None:
    imported: set[str] = set()
    for path in ENGINE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party == {"numpy", "torch"}
