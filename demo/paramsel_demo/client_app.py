"""The ClientApp: an FL4Health-style client whose parameter exchange is paramsel's drop-in SDK.

Each node is client ``partition-id`` of ``num-partitions`` (its node config) and trains on that shard of
the digits. Its model lives in the node's ``context.state`` between messages, one per run, so that a
pull keeps what the aggregate does not cover (``pull_mode="scatter"``). Per round:

- a ``train`` message (config: run, round; no arrays, the node holds its model): train from the model as
  it stands, then push through the paramsel service: FL4Health's selection of the criterion, as a compact
  payload (top-k) or as FL4Health's packed list (whole layers); the dense run sends the whole state;
- an ``evaluate`` message (arrays: the aggregate): pull it into the model, evaluate on the held-out split.

Every reply carries the client's figures (bytes, losses, accuracy) in its MetricRecord; the first train
reply of a run also carries the initial model's accuracy.

For ``paramsel-demo --compare`` the messages' config also names the exchange (``method``) and the run's
seed (``run-seed``); the replies then add the bytes of their payload records as Flower would put them on
the wire (``wire-bytes-sent`` / ``-received``). Sparse updates with error feedback keep the round's
initial model (the global one, to which the aggregate is added) and the residual in ``context.state``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from paramsel_demo.compare import DENSE, METHODS_BY_KEY, UPDATES, Method, round_seed
from paramsel_demo.settings import DENSE_RUN, SCORE_CRITERIA, DemoSettings, RunConfig, run_config_str
from paramsel_demo.task import (
    HIDDEN_UNITS,
    LEARNING_RATE,
    Shard,
    evaluate,
    initial_model,
    load_shard,
    round_generator,
    train,
)
from paramsel_demo.wire import (
    METRICS,
    PAYLOAD,
    NDArrays,
    arrays_record,
    compact_arrays,
    compact_payload,
    flower_wire_bytes,
    payload_bytes,
    record_arrays,
)

app = ClientApp()


class Exchange(Protocol):
    """How one run's payloads are made and applied on the client."""

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        """The payload to send: the arrays that travel to the ServerApp."""
        ...

    def packed(self, payload: NDArrays) -> NDArrays:
        """FL4Health's packed list of a payload (the payload itself when it is one)."""
        ...

    def pull(self, packed: NDArrays, model: nn.Module) -> None: ...


class CompactExchange:
    """Top-k selections as paramsel's compact payloads both ways: ``push_compact`` up, ``unpack_compact``
    of the aggregate down, pulled by the same ``SparseCooParameterExchanger``."""

    def __init__(self, settings: DemoSettings, target: str | None) -> None:
        import paramsel.client as sdk

        score: Callable[..., object] = getattr(sdk, f"{settings.criterion}_scores")
        self.exchanger = sdk.SparseCooParameterExchanger(
            settings.sparsity, score, target=target, pull_mode="scatter"
        )

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        return compact_arrays(self.exchanger.push_compact(model, initial))

    def packed(self, payload: NDArrays) -> NDArrays:
        from paramsel.client import unpack_compact

        return unpack_compact(compact_payload(payload))

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        self.exchanger.pull_parameters(packed, model)


class LayerExchange:
    """Whole layers by drift (``DynamicLayerExchanger``), as FL4Health's packed list both ways."""

    def __init__(self, settings: DemoSettings, target: str | None) -> None:
        from paramsel.client import DynamicLayerExchanger, LayerSelectionFunctionConstructor

        constructor = LayerSelectionFunctionConstructor(
            norm_threshold=settings.norm_threshold, exchange_percentage=settings.sparsity, target=target
        )
        select = (
            constructor.select_by_threshold()
            if settings.criterion == "layers_threshold"
            else constructor.select_by_percentage()
        )
        self.exchanger = DynamicLayerExchanger(select, target=target)

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        return self.exchanger.push_parameters(model, initial)

    def packed(self, payload: NDArrays) -> NDArrays:
        return payload

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        self.exchanger.pull_parameters(packed, model)


class DenseExchange:
    """Flower's FedAvg: the whole state (arrays in state order) up, the averaged state down."""

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]

    def packed(self, payload: NDArrays) -> NDArrays:
        return payload

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        names = list(model.state_dict())
        if len(packed) != len(names):
            raise ValueError(f"the aggregate has {len(packed)} arrays, the model {len(names)} tensors")
        model.load_state_dict(
            {name: torch.from_numpy(np.array(a)) for name, a in zip(names, packed, strict=True)}
        )


class UpdateExchange:
    """Sparse updates with error feedback (``SparseUpdateExchanger``, beyond FL4Health): the selected
    entries of u = (w - w0) + residual up, as a compact payload; the per-coordinate average of the
    clients' updates down, added to the round's initial model (``pull_compact``). The residual lives in
    the node's state between rounds (:class:`DigitsClient` hands it over), not in this object."""

    def __init__(self, method: Method, target: str | None) -> None:
        from paramsel.client import SparseUpdateExchanger

        self.exchanger = SparseUpdateExchanger(
            method.sparsity,
            selection=method.selection,
            value_dtype=torch.float16 if method.value_dtype == "float16" else None,
            target=target,
        )

    def push_update(
        self, model: nn.Module, initial: nn.Module, *, seed: int, residual: dict[str, torch.Tensor]
    ) -> tuple[NDArrays, dict[str, torch.Tensor]]:
        """The payload of this round's update, and the residual to carry to the next round."""
        self.exchanger.residual = residual
        payload = compact_arrays(self.exchanger.push_compact(model, initial, seed=seed))
        return payload, dict(self.exchanger.residual)

    def push(self, model: nn.Module, initial: nn.Module) -> NDArrays:
        raise TypeError("an update needs its residual and seed: call push_update")

    def packed(self, payload: NDArrays) -> NDArrays:
        return payload

    def pull(self, packed: NDArrays, model: nn.Module) -> None:
        self.exchanger.pull_compact(compact_payload(packed), model)


def make_exchange(settings: DemoSettings, run: str, target: str | None) -> Exchange:
    """The exchange of ``run``, calling the paramsel service at ``target`` (else the SDK's default)."""
    if run == DENSE_RUN:
        return DenseExchange()
    if settings.criterion in SCORE_CRITERIA:
        return CompactExchange(settings, target)
    return LayerExchange(settings, target)


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


@functools.lru_cache(maxsize=32)
def _exchange(settings: DemoSettings, run: str, target: str | None, index: int) -> Exchange:
    """Client ``index``'s exchange of ``run``, kept for the process's life: the Simulation Engine runs
    every node's messages in a few long-lived workers, and the exchangers keep their channels."""
    return make_exchange(settings, run, target)


@functools.lru_cache(maxsize=32)
def _compare_exchange(settings: DemoSettings, key: str, target: str | None, index: int) -> Exchange:
    """Client ``index``'s exchange of one of ``paramsel-demo --compare``'s methods (kept for the process's
    life as :func:`_exchange`; whatever a run carries between rounds lives in the node's state)."""
    method = METHODS_BY_KEY[key]
    if method.kind == DENSE:
        return DenseExchange()
    if method.kind == UPDATES:
        return UpdateExchange(method, target)
    return CompactExchange(
        dataclasses.replace(settings, criterion="largest_magnitude_change", sparsity=method.sparsity), target
    )


def hidden_units(config: RunConfig) -> int:
    """The MLP's hidden units: the run config's ``hidden-units``; 0 (the app's default) means the demo's
    32, or :data:`paramsel_demo.compare.COMPARE_HIDDEN_UNITS` when the run is a comparison."""
    from paramsel_demo.compare import COMPARE_HIDDEN_UNITS

    value = config.get("hidden-units", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"run config 'hidden-units' must be an integer >= 0, got {value!r}")
    if value:
        return value
    return COMPARE_HIDDEN_UNITS if config.get("compare") is True else HIDDEN_UNITS


def learning_rate(config: RunConfig) -> float:
    """SGD's step size: the run config's ``learning-rate``; 0 (the app's default) or absent means the
    task's :data:`paramsel_demo.task.LEARNING_RATE`."""
    value = config.get("learning-rate", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"run config 'learning-rate' must be a number >= 0, got {value!r}")
    return float(value) or LEARNING_RATE


@functools.lru_cache(maxsize=32)
def _shard(index: int, clients: int, skew: float, seed: int) -> Shard:
    """Client ``index``'s shard, loaded once per process."""
    return load_shard(index, clients, skew=skew, seed=seed)


class DigitsClient:
    """One node's client for one run, laid out as an FL4Health client: a model, the model it started the
    round from (``initial_model``), a parameter exchanger, ``get_parameters`` / ``set_parameters``.

    A run of ``paramsel-demo --compare`` names its method and seed in the message's config (``method``,
    ``run-seed``): the seed then fixes the model's initialization and batch order (the data split stays
    the run config's ``seed``), and the figures add the bytes of the payload records as Flower would put
    them on the wire. For sparse updates the node keeps the round's initial model (every client's copy
    of the global model; the aggregate is added to it) and its error-feedback residual."""

    def __init__(self, message: Message, context: Context) -> None:
        torch.set_num_threads(1)
        self.context = context
        self.settings = DemoSettings.from_run_config(context.run_config)
        config = message.content.config_records["config"]
        self.run = str(config["run"])
        self.round = _integer(config["server-round"], "server-round")
        self.index = _integer(context.node_config["partition-id"], "partition-id")
        partitions = _integer(context.node_config["num-partitions"], "num-partitions")
        if partitions != self.settings.clients:
            raise ValueError(
                f"this node is one of {partitions} partitions, but the run has {self.settings.clients} clients"
            )
        target = run_config_str(context.run_config, "paramsel-target") or None
        self.method: Method | None = None
        self.seed = self.settings.seed
        if "method" in config:  # a run of paramsel-demo --compare
            key = str(config["method"])
            if key not in METHODS_BY_KEY:
                raise ValueError(f"unknown method {key!r}")
            self.method = METHODS_BY_KEY[key]
            self.seed = _integer(config["run-seed"], "run-seed")
            self.parameter_exchanger = _compare_exchange(self.settings, key, target, self.index)
        else:
            self.parameter_exchanger = _exchange(self.settings, self.run, target, self.index)
        self.shard = _shard(self.index, self.settings.clients, self.settings.skew, self.settings.seed)
        self._key = f"{self.run}-model"
        self._residual_key = f"{self.run}-residual"
        self.model = initial_model(self.seed, hidden_units(context.run_config))
        self.fresh = self._key not in context.state.array_records
        if not self.fresh:
            self.model.load_state_dict(context.state.array_records[self._key].to_torch_state_dict())
        elif self.method is not None:
            self._forget_other_runs()
        self.initial_model = copy.deepcopy(self.model)

    @property
    def updates(self) -> bool:
        return self.method is not None and self.method.kind == UPDATES

    def _forget_other_runs(self) -> None:
        """A comparison's runs follow one another: what the node kept for the earlier ones goes."""
        for key in list(self.context.state.array_records):
            if key.endswith(("-model", "-residual")):
                del self.context.state[key]

    def keep_model(self, model: nn.Module | None = None) -> None:
        """Stores the model (or ``model``) in the node's state for the run's next message."""
        self.context.state[self._key] = ArrayRecord((model or self.model).state_dict())

    def get_parameters(self) -> NDArrays:
        """The payload to send: the selection pushed through paramsel (or the whole state)."""
        return self.parameter_exchanger.push(self.model, self.initial_model)

    def set_parameters(self, packed: NDArrays) -> None:
        """Pulls an aggregate (FL4Health's packed list, or the whole state) into the model."""
        self.parameter_exchanger.pull(packed, self.model)

    def _push_update(self) -> NDArrays:
        """Sparse updates: the update's payload; the new residual and the round's initial model are kept
        (the trained model is not: what it did not send lives on in the residual)."""
        assert isinstance(self.parameter_exchanger, UpdateExchange)
        assert self.method is not None
        kept = self.context.state.array_records.get(self._residual_key)
        residual = dict(kept.to_torch_state_dict()) if kept is not None else {}
        seed = round_seed(self.seed, self.round) if self.method.selection == "random_k" else 0
        payload, residual = self.parameter_exchanger.push_update(
            self.model, self.initial_model, seed=seed, residual=residual
        )
        self.context.state[self._residual_key] = ArrayRecord(
            {name: tensor.detach().cpu().contiguous() for name, tensor in residual.items()}
        )
        self.keep_model(self.initial_model)
        return payload

    def fit(self) -> tuple[NDArrays, MetricRecord]:
        metrics: dict[str, MetricRecordValues] = {
            "client": self.index,
            "num-examples": len(self.shard.y_train),
        }
        if self.fresh:  # the run's first round: the seeded initial model's figures
            accuracy, loss = evaluate(self.model, self.shard.x_test, self.shard.y_test)
            metrics |= {"initial-accuracy": accuracy, "initial-loss": loss}
        generator = round_generator(self.seed, self.index, self.round)
        train_loss = train(
            self.model,
            self.shard.x_train,
            self.shard.y_train,
            epochs=self.settings.local_epochs,
            generator=generator,
            learning_rate=learning_rate(self.context.run_config),
        )
        if self.updates:
            payload = self._push_update()
        else:
            payload = self.get_parameters()
            self.keep_model()
        metrics |= {
            "train-loss": train_loss,
            "bytes-sent": payload_bytes(payload),
            "fl4health-list-bytes-sent": payload_bytes(self.parameter_exchanger.packed(payload)),
        }
        return payload, MetricRecord(metrics)

    def validate(self, payload: NDArrays, wire_bytes: int | None = None) -> MetricRecord:
        if self.fresh:
            raise ValueError(
                f"client {self.index} has no model of run {self.run!r} to pull an aggregate into"
            )
        packed = self.parameter_exchanger.packed(payload)
        self.set_parameters(packed)
        self.keep_model()
        accuracy, loss = evaluate(self.model, self.shard.x_test, self.shard.y_test)
        metrics: dict[str, MetricRecordValues] = {
            "client": self.index,
            "num-examples": len(self.shard.y_test),
            "accuracy": accuracy,
            "loss": loss,
            "bytes-received": payload_bytes(payload),
            "fl4health-list-bytes-received": payload_bytes(packed),
        }
        if wire_bytes is not None:
            metrics["wire-bytes-received"] = wire_bytes
        return MetricRecord(metrics)


@app.train()
def train_round(message: Message, context: Context) -> Message:
    """Trains one round and sends the selection (pushed through paramsel)."""
    client = DigitsClient(message, context)
    payload, metrics = client.fit()
    record = arrays_record(payload)
    if client.method is not None:
        metrics["wire-bytes-sent"] = flower_wire_bytes(record)
    content = RecordDict({PAYLOAD: record, METRICS: metrics})
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate_round(message: Message, context: Context) -> Message:
    """Pulls the round's aggregate and evaluates the model on the held-out split."""
    client = DigitsClient(message, context)
    record = message.content.array_records[PAYLOAD]
    wire = flower_wire_bytes(record) if client.method is not None else None
    metrics = client.validate(record_arrays(record), wire)
    return Message(content=RecordDict({METRICS: metrics}), reply_to=message)
