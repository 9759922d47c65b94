"""The contract works from another language: examples/node/client.js against a real ``paramsel serve``.

The JavaScript client loads proto/ itself, streams a model in chunks, decodes Elias-Fano and bitmap
positions and dense tensors, computes the expected selections on its own and exits non-zero on any
mismatch (docs/clients.md is what it was written from). It also checks the rules the proto states for
Aggregate, Pull and top-k (top-k by scores of its own, SCORE_FUNCTION_SUPPLIED, included), and writes out the contributions it aggregated and the answers it got: this
test aggregates the same contributions with the Python SDK, in another order, and the bytes must be
identical - the server, not the caller, puts them in FL4Health's order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import Output, serve_process

from paramsel.client import (
    Averaging,
    Client,
    PayloadKind,
    SparseTensor,
    aggregate_layers,
    aggregate_sparse_coo,
)

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.slow,  # npm ci, `paramsel serve` and node
    pytest.mark.skipif(NODE is None, reason="node is not on PATH (the JavaScript client needs Node >= 18)"),
]


def _install_dependencies() -> None:
    """``npm ci`` from the committed lock file, once: node_modules/ is not in git."""
    if all((NODE_DIR / "node_modules" / "@grpc" / name).is_dir() for name in ("grpc-js", "proto-loader")):
        return
    npm = shutil.which("npm")
    assert npm is not None, "node is on PATH but npm is not: cannot install examples/node's dependencies"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"


_DTYPES = {"DATA_TYPE_FLOAT32": np.float32, "DATA_TYPE_FLOAT64": np.float64}


def _values(tensor: dict[str, Any]) -> np.ndarray:
    values: np.ndarray = np.frombuffer(bytes.fromhex(tensor["values"]), _DTYPES[tensor["dtype"]]).copy()
    return values if "coords" in tensor else values.reshape(tensor["shape"])


def _sparse_results(emitted: dict[str, Any]) -> list[tuple[list[np.ndarray], int]]:
    """The Node client's sparse contributions as FL4Health's packed lists, in the order it made them."""
    results = []
    for contribution in emitted["contributions"]:
        tensors = contribution["tensors"]
        packed = [
            *(_values(t) for t in tensors),
            *(np.array(t["coords"], np.int64).reshape(len(t["coords"]), len(t["shape"])) for t in tensors),
            *(np.array(t["shape"], np.int64) for t in tensors),
            np.array([t["name"] for t in tensors]),
        ]
        results.append((packed, int(contribution["num_examples"])))
    return results


def _layer_results(emitted: dict[str, Any]) -> list[tuple[list[np.ndarray], int]]:
    return [
        (
            [*(_values(t) for t in c["tensors"]), np.array([t["name"] for t in c["tensors"]])],
            int(c["num_examples"]),
        )
        for c in emitted["contributions"]
    ]


def _summed_in(results: list[tuple[list[np.ndarray], int]], order: list[int]) -> dict[str, bytes]:
    """FedAvg of the sparse results summed in ``order`` as given: what a server that did not sort gives."""
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, int] = {}
    for index in order:
        packed, count = results[index]
        n = (len(packed) - 1) // 3
        for j in range(n):
            name, shape = str(packed[-1][j]), tuple(int(d) for d in packed[2 * n + j])
            values = torch.from_numpy(packed[j])
            coords = tuple(torch.from_numpy(packed[n + j]).T)
            dense = torch.zeros(shape, dtype=values.dtype).index_put_(coords, values, accumulate=True) * count
            sums[name] = dense if name not in sums else torch.add(sums[name], dense)
            totals[name] = totals.get(name, 0) + count
    return {name: (total / totals[name]).numpy().tobytes() for name, total in sums.items()}


def _check_same_bytes_as_the_sdk(emitted: dict[str, Any], target: str) -> None:
    sparse = emitted["sparse"]
    results = _sparse_results(sparse)
    # The contributions are order-sensitive: summed as sent, and in the reverse order, they differ.
    order = sparse["sent_order"]
    assert order != sorted(order)
    assert _summed_in(results, order) != _summed_in(results, order[::-1])
    packed = aggregate_sparse_coo(results, target=target)  # the SDK, in the order they were made
    n = (len(packed) - 1) // 3
    assert packed[-1].tolist() == [a["name"] for a in sparse["answer"]]
    for i, answer in enumerate(sparse["answer"]):
        assert packed[i].dtype == _DTYPES[answer["dtype"]], answer["name"]
        assert packed[i].tobytes().hex() == answer["values"], answer["name"]
        assert packed[n + i].astype(np.int64).tobytes().hex() == answer["positions"], answer["name"]
        assert packed[2 * n + i].tolist() == answer["shape"], answer["name"]
    layers = emitted["layers"]
    packed = aggregate_layers(_layer_results(layers), target=target)
    assert packed[-1].tolist() == [a["name"] for a in layers["answer"]]
    for array, answer in zip(packed[:-1], layers["answer"], strict=True):
        assert array.dtype == _DTYPES[answer["dtype"]], answer["name"]
        assert array.tobytes().hex() == answer["values"], answer["name"]


def _check_per_coordinate_bytes(path: Path, target: str) -> None:
    """The Node client's per-coordinate contributions, aggregated by the SDK in the reverse order: the
    answer's bytes are the ones the Node client got."""
    emitted = json.loads(path.read_text())
    no_layers: list[tuple[str, torch.Tensor]] = []
    contributions = [
        (
            int(c["num_examples"]),
            no_layers,
            [
                SparseTensor(
                    t["name"],
                    tuple(t["shape"]),
                    torch.from_numpy(np.frombuffer(bytes.fromhex(t["values"]), np.float32).copy()),
                    torch.tensor(t["flat"], dtype=torch.int64),
                )
                for t in c["tensors"]
            ],
        )
        for c in emitted["contributions"]
    ]
    answer = Client(target=target).aggregate(
        PayloadKind.SPARSE_COO, contributions[::-1], averaging=Averaging.PER_COORDINATE, keep_frames=True
    )
    (tensor,) = answer.sparse
    assert tensor.positions.tolist() == [0, 2, 3]
    assert tensor.values.tolist() == [1.0, 7.0, -2.0]
    want = bytes.fromhex(emitted["answer"]["data"])
    assert tensor.values.numpy().tobytes() == want[: tensor.values.numel() * 4]


def test_node_client_selects_and_decodes_against_a_real_server(tmp_path: Path) -> None:
    assert NODE is not None
    _install_dependencies()
    output = Output()
    emitted = tmp_path / "aggregate.json"
    with serve_process(output=output) as (_, target):
        run = subprocess.run(
            [NODE, str(NODE_DIR / "client.js"), "--target", target, "--emit", str(emitted)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if run.returncode == 0:
            _check_same_bytes_as_the_sdk(json.loads(emitted.read_text()), target)
            _check_per_coordinate_bytes(Path(f"{emitted}.per_coordinate.json"), target)
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "node client: all checks passed", report
    assert not any(line.startswith("FAIL") for line in lines), report
    # Both sparse position decoders and the error paths were exercised, not skipped.
    assert any("ELIAS_FANO and POSITION_ENCODING_BITMAP" in line for line in lines), report
    assert any("INVALID_ARGUMENT" in line and "sparsity_level" in line for line in lines), report
    assert any("INITIAL_MODEL_NOT_HELD" in line for line in lines), report
    # The rules of Aggregate, Pull and top-k were exercised, not skipped.
    for rule in (
        "aggregate sparse: orders",
        "aggregate layers: orders",
        "aggregate ties:",
        "aggregate COMPACT: tie POSITION_ENCODING_ELIAS_FANO",
        "k = ceil(100 x 0.07) in double = 8",
        "pull replace: every named tensor",
        "pull scatter: repeats summed",
        # Top-k by the caller's own scores (SCORE_FUNCTION_SUPPLIED): the hand-worked selection
        # through Select and Push, and a refusal naming the tensor without scores.
        "supplied scores: Select N, k, selected, sent = 8 4 4 3",
        "supplied scores: Select sent w@1=-1, w@3=3, b@1=8",
        "supplied scores: Push packed values, indices, shapes: w=-1 3, b=8, w=0 1 1 0, b=1, w=2 3, b=2",
        "supplied scores without b: status 3",
        # Beyond FL4Health: seeded random-k positions drawn in JavaScript equal the server's (and the
        # positions the Python tests pin for seed 42), error feedback by the proto's rule over three
        # rounds, per-coordinate averages in both orders, and the pull that adds an update.
        "random-k: seeds, counts and no position bytes",
        "random-k: positions drawn here from seed 42 are the ones the Python tests pin: 1,4,15,16,18",
        "random-k: the server's explicit positions equal those drawn here",
        "error feedback round 1: sent 1:-3 3:2, residual 1 0 0.5 0",
        "error feedback round 3: sent 0:0.25 2:-1, residual 0 -0.125 0 0",
        "per-coordinate: 0:1 2:7 3:-2, the same bytes in both orders",
        "pull add: w=12 20 30 44",
    ):
        assert any(line.startswith("ok") and rule in line for line in lines), (
            f"{rule!r} not checked\n{report}"
        )
