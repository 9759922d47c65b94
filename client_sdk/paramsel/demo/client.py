"""A demo client: trains on its non-IID shard; per round pushes through the paramsel service, submits
the selection to the coordinator, pulls the aggregate, evaluates on the held-out split and reports.

Every run starts from the same seeded model. The sparse run exchanges what the criterion selects, with
paramsel's drop-in exchangers: ``SparseCooParameterExchanger`` (top-k by a score function; submitted
as ``push_compact``'s compact payload, the aggregate fetched as one and expanded by ``unpack_compact``;
pulled with ``pull_mode="scatter"`` so the coordinates nobody sent keep their local values) or
``DynamicLayerExchanger`` (whole layers by drift, as FL4Health's packed list). The dense run sends the
whole state, as FedAvgDynamicLayer's packed list (every layer, then the names).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from paramsel.demo.data import load_shard
from paramsel.demo.model import evaluate, initial_model, round_generator, train
from paramsel.demo.protocol import (
    DENSE_RUN,
    SCORE_CRITERIA,
    CoordinatorStub,
    DemoConfig,
    compact_arrays,
    compact_payload,
    payload_bytes,
)

if TYPE_CHECKING:
    from paramsel.client import SparseCooParameterExchanger

NDArrays = list[np.ndarray]


class Exchange(Protocol):
    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        """The payload to submit: the arrays that travel to the coordinator."""
        ...

    def packed(self, payload: NDArrays) -> NDArrays:
        """FL4Health's packed list of a payload (the payload itself when it is one)."""
        ...

    def pull(self, packed: NDArrays, model: nn.Module) -> None: ...


class _Exchanger(Protocol):
    def push_parameters(self, model: nn.Module, initial_model: nn.Module | None = None) -> NDArrays: ...

    def pull_parameters(self, parameters: NDArrays, model: nn.Module) -> None: ...


class SelectedExchange:
    """Pushes through the service with a drop-in exchanger; pulls with the same exchanger."""

    def __init__(self, exchanger: _Exchanger) -> None:
        self.exchanger = exchanger

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        return self.exchanger.push_parameters(model, initial)

    def packed(self, payload: NDArrays) -> NDArrays:
        return payload

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        self.exchanger.pull_parameters(packed, model)


class CompactExchange:
    """Top-k selections as compact payloads both ways: ``push_compact`` up, ``unpack_compact`` of the
    aggregate down; pulled by the same exchanger."""

    def __init__(self, exchanger: SparseCooParameterExchanger) -> None:
        self.exchanger = exchanger

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        return compact_arrays(self.exchanger.push_compact(model, initial))

    def packed(self, payload: NDArrays) -> NDArrays:
        from paramsel.client import unpack_compact

        return unpack_compact(compact_payload(payload))

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        self.exchanger.pull_parameters(packed, model)


class DenseExchange:
    """The whole state, as FedAvgDynamicLayer's packed list; pulled by DynamicLayerExchanger."""

    def __init__(self, target: str | None) -> None:
        from paramsel.client import DynamicLayerExchanger, LayerSelectionFunctionConstructor

        every_layer = LayerSelectionFunctionConstructor(1.0, 1.0, target=target).select_by_percentage()
        self._exchanger = DynamicLayerExchanger(every_layer, target=target)

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        state = model.state_dict()
        return [*(t.detach().cpu().numpy().copy() for t in state.values()), np.array(list(state))]

    def packed(self, payload: NDArrays) -> NDArrays:
        return payload

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        self._exchanger.pull_parameters(packed, model)


def make_exchange(config: DemoConfig, run: str, target: str | None) -> Exchange:
    """The exchange of ``run`` under ``config``, calling the service at ``target`` (else the SDK's default)."""
    import paramsel.client as sdk

    if run == DENSE_RUN:
        return DenseExchange(target)
    if config.criterion in SCORE_CRITERIA:
        score: Callable[..., object] = getattr(sdk, f"{config.criterion}_scores")
        return CompactExchange(
            sdk.SparseCooParameterExchanger(config.sparsity, score, target=target, pull_mode="scatter")
        )
    constructor = sdk.LayerSelectionFunctionConstructor(
        norm_threshold=config.norm_threshold, exchange_percentage=config.sparsity, target=target
    )
    select = (
        constructor.select_by_threshold()
        if config.criterion == "layers_threshold"
        else constructor.select_by_percentage()
    )
    return SelectedExchange(sdk.DynamicLayerExchanger(select, target=target))


def run_client(
    index: int,
    clients: int,
    coordinator: str,
    *,
    target: str | None = None,
    connect_timeout: float = 60.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Carries out every run the coordinator asks for, as client ``index`` of ``clients``."""
    torch.set_num_threads(1)
    with CoordinatorStub(coordinator) as stub:
        config = stub.config(timeout=connect_timeout)
        if config.clients != clients:
            raise ValueError(
                f"the coordinator runs {config.clients} clients, but this one was told {clients}"
            )
        if not 0 <= index < clients:
            raise ValueError(f"client index must be in [0, {clients}), got {index}")
        shard = load_shard(index, clients, skew=config.skew, seed=config.seed)
        counts = np.bincount(shard.y_train, minlength=10).tolist()
        log(f"client {index}: {len(shard.y_train)} training examples, per digit {counts}")
        for run in config.runs:
            exchange = make_exchange(config, run, target)
            model = initial_model(config.seed)
            accuracy, loss = evaluate(model, shard.x_test, shard.y_test)
            stub.report(
                run,
                0,
                index,
                accuracy=accuracy,
                loss=loss,
                train_loss=0.0,
                bytes_sent=0,
                bytes_received=0,
                fl4health_list_bytes_sent=0,
                fl4health_list_bytes_received=0,
            )
            for round_number in range(1, config.rounds + 1):
                start = copy.deepcopy(model)
                generator = round_generator(config.seed, index, round_number)
                train_loss = train(
                    model, shard.x_train, shard.y_train, epochs=config.local_epochs, generator=generator
                )
                sent = exchange.push(model, start)
                stub.submit(run, round_number, index, len(shard.y_train), sent)
                received = stub.fetch(run, round_number)
                aggregate = exchange.packed(received)
                exchange.pull(aggregate, model)
                accuracy, loss = evaluate(model, shard.x_test, shard.y_test)
                stub.report(
                    run,
                    round_number,
                    index,
                    accuracy=accuracy,
                    loss=loss,
                    train_loss=train_loss,
                    bytes_sent=payload_bytes(sent),
                    bytes_received=payload_bytes(received),
                    fl4health_list_bytes_sent=payload_bytes(exchange.packed(sent)),
                    fl4health_list_bytes_received=payload_bytes(aggregate),
                )
                log(f"client {index}: {run} round {round_number}: accuracy {accuracy:.4f}")
