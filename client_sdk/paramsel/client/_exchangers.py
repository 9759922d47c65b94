"""Drop-in replacements for FL4Health's parameter exchangers: same names, signatures and packed lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from paramsel.client import _embedded
from paramsel.client._client import Client, SelectResult
from paramsel.client._compact import compact_payload, fl4health_sparse
from paramsel.client._connection import Connection
from paramsel.client._criteria import (
    LayerCriterion,
    layer_criterion,
    layers_served,
    score_criterion,
    select_layers,
    select_scores_and_sample_masks,
)
from paramsel.client._errors import invalid_argument, local_errors
from paramsel.client._memory import kept_memory
from paramsel.client._packing import SparseInfo, pack_layers, pack_sparse, unpack_layers, unpack_sparse
from paramsel.client._state import NDArrays, load_changed, read_only_tensor, state_of, to_numpy, to_tensor
from paramsel.client._types import DriftPercentage, DriftThreshold, FedPm, ScoreFunction, TopK
from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, WireError
from paramsel.wire.positions import coo_to_flat

Config = dict[str, Any]


def _check_sparsity_level(sparsity_level: float) -> None:
    if not 0 < sparsity_level <= 1:  # as the service refuses it: INVALID_ARGUMENT (a ValueError)
        raise invalid_argument(f"sparsity_level must be in (0, 1], got {sparsity_level}")


def _pull_mode(pull_mode: str) -> str:
    if pull_mode not in _embedded.PULL_MODES:
        raise invalid_argument(f"pull_mode must be 'replace' or 'scatter', got {pull_mode!r}")
    return pull_mode


class SparseCooParameterPacker:
    """FL4Health's packer of the same name: [values..., indices..., shapes..., np.array(names)]."""

    def pack_parameters(self, model_parameters: NDArrays, additional_parameters: SparseInfo) -> NDArrays:
        return pack_sparse(model_parameters, additional_parameters)

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, SparseInfo]:
        return unpack_sparse(packed_parameters)

    @staticmethod
    def extract_coo_info_from_dense(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The non-zero values of ``x`` (row-major), their (nnz, ndim) indices and ``x``'s shape."""
        coords = torch.nonzero(x)
        return x[x != 0].cpu().numpy(), coords.cpu().numpy(), np.array(list(x.shape))


class ParameterPackerWithLayerNames:
    """FL4Health's packer of the same name: [arrays..., np.array(names)]."""

    def pack_parameters(self, model_weights: NDArrays, weights_names: list[str]) -> NDArrays:
        return pack_layers(model_weights, weights_names)

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, list[str]]:
        return unpack_layers(packed_parameters)


class SparseCooParameterExchanger:
    """Top-k parameters by a score, packed as sparse COO (FL4Health's class of the same name).

    Options beyond FL4Health, none of which changes the default behaviour:

    - ``exact_k=True`` selects exactly k entries, ties at the threshold broken by state position;
    - ``pull_mode="scatter"`` writes only the received coordinates and keeps the rest of each tensor
      (the default ``"replace"`` is FL4Health's: unsent coordinates become 0);
    - ``reuse_initial_model=False`` uploads the initial model on every push instead of naming it by
      digest and uploading it only when the server does not hold it.

    The six score functions are applied by the service. Any other ``score_gen_function`` (called as
    FL4Health calls it, ``(model, initial_model) -> {name: scores}``) runs here, and its scores are sent
    to the service with the model, which selects their top-k with the same rules
    (``ScoreFunction.SUPPLIED``; the initial model is not sent); so does a subclass's own
    ``generate_parameter_scores``. As in FL4Health, only the tensors the scores name take part, in the
    scores' order; a name the model lacks, or scores of another shape, are refused with INVALID_ARGUMENT
    (FL4Health fails on them too).

    As in FL4Health, every attribute (``sparsity_level``, ``score_gen_function``, ``parameter_packer``
    and the options above) is read when a call is made: assigning one takes effect at the next call.
    """

    def __init__(
        self,
        sparsity_level: float,
        score_gen_function: Callable[..., Any],
        *,
        target: str | None = None,
        connection: Connection | None = None,
        exact_k: bool = False,
        pull_mode: str = "replace",
        reuse_initial_model: bool = True,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    ) -> None:
        _check_sparsity_level(sparsity_level)
        _pull_mode(pull_mode)
        self.sparsity_level = sparsity_level
        self.score_gen_function = score_gen_function
        self.parameter_packer = SparseCooParameterPacker()
        self.exact_k = exact_k
        self.pull_mode = pull_mode
        self.reuse_initial_model = reuse_initial_model
        self.client = Client(target=target, connection=connection, chunk_size_bytes=chunk_size_bytes)

    @property
    def criterion(self) -> TopK | None:
        """The criterion the service applies, made from the attributes as they are now; None when the
        scores are computed here (a caller's own score function, or an overridden
        ``generate_parameter_scores``) and sent with ``TopK(..., ScoreFunction.SUPPLIED)``."""
        if type(self).generate_parameter_scores is not SparseCooParameterExchanger.generate_parameter_scores:
            return None
        return score_criterion(
            self.score_gen_function, float(self.sparsity_level), exact_k=bool(self.exact_k)
        )

    def generate_parameter_scores(self, model: nn.Module, initial_model: nn.Module | None) -> dict[str, Any]:
        """The scores of every state entry, computed locally by the score function."""
        return dict(self.score_gen_function(model, initial_model))

    def select_parameters(
        self, model: nn.Module, initial_model: nn.Module | None = None
    ) -> tuple[NDArrays, SparseInfo]:
        """(values per tensor, (indices per tensor, shapes per tensor, names)), as FL4Health returns."""
        _check_sparsity_level(self.sparsity_level)
        return fl4health_sparse(self._select(model, initial_model).sparse)

    def push_parameters(
        self, model: nn.Module, initial_model: nn.Module | None = None, config: Config | None = None
    ) -> NDArrays:
        """[values..., indices..., shapes..., names], FL4Health's packed list.

        The selection travels compactly (raw values, Elias-Fano or bitmap positions) and is expanded
        to FL4Health's layout here.
        """
        return self.pack_parameters(*self.select_parameters(model, initial_model))

    def push_compact(
        self,
        model: nn.Module,
        initial_model: nn.Module | None = None,
        *,
        value_dtype: torch.dtype | None = None,
    ) -> bytes:
        """The selection as a compact payload (about 4.7 B per float32 value at 10 %), for clients that
        ship it to their aggregator; ``unpack_compact`` turns it into FL4Health's packed list.
        ``value_dtype`` (torch.float16 or torch.bfloat16) makes the values lossy and smaller."""
        _check_sparsity_level(self.sparsity_level)
        selected = self._select(model, initial_model, value_dtype, keep_frames=True)
        return compact_payload(selected.frames or [])

    def _select(
        self,
        model: nn.Module,
        initial_model: nn.Module | None,
        value_dtype: torch.dtype | None = None,
        *,
        keep_frames: bool = False,
    ) -> SelectResult:
        criterion = self.criterion
        if criterion is None:  # the caller's own scores, computed here: the service selects their top-k
            supplied = TopK(float(self.sparsity_level), ScoreFunction.SUPPLIED, bool(self.exact_k))
            scores = self.generate_parameter_scores(model, initial_model)
            state = state_of(model)
            # As FL4Health: the scored tensors only, in the scores' order (k counts their entries). A
            # name the model lacks is sent on for the service to refuse; no scores at all, likewise.
            scored = {name: state[name] for name in scores if name in state} or state
            return self.client.select(
                supplied,
                scored,
                None,  # not needed: the scores are all the service compares
                value_dtype=value_dtype,
                keep_frames=keep_frames,
                scores=scores,
            )
        return self.client.select(
            criterion,
            state_of(model),
            state_of(initial_model) if initial_model else None,
            value_dtype=value_dtype,
            reuse_initial=self.reuse_initial_model,
            keep_frames=keep_frames,
        )

    def pull_parameters(self, parameters: NDArrays, model: nn.Module, config: Config | None = None) -> None:
        """Replaces each named tensor by its densified COO tensor (or scatters into it).

        Applied in this process by the engine the server runs, straight into the model's tensors:
        a round trip would only carry the payload there and the dense tensors back.
        """
        mode = _pull_mode(self.pull_mode)
        values, (indices, shapes, names) = self.parameter_packer.unpack_parameters(parameters)
        # Kept memory, as around every call of the SDK: the pull's temporaries (4 bytes per position)
        # come from memory the last pull freed instead of pages faulted in afresh.
        with local_errors(), kept_memory():
            parts = []
            for v, i, shape, name in zip(values, indices, shapes, names, strict=True):
                dense_shape = tuple(int(d) for d in np.asarray(shape).reshape(-1))
                what = f"payload tensor '{name}'"
                coords = np.asarray(i, dtype=np.int64)
                if coords.ndim != 2 or coords.shape[1] != len(dense_shape):
                    # A 0-d tensor's indices are (nnz, 0): reshape(-1, 0) could not tell nnz.
                    if not dense_shape or coords.size % len(dense_shape):
                        raise WireError(
                            f"{what}: indices of shape {coords.shape} do not fit a {len(dense_shape)}-d tensor"
                        )
                    coords = coords.reshape(-1, len(dense_shape))
                # The values are only read: no copy of them (the engine casts them if the dtype differs).
                parts.append((name, dense_shape, read_only_tensor(v), coords, what))
            state = model.state_dict()
            if mode == "replace" and _embedded.replace_coo_into(
                state, [(name, shape, v, read_only_tensor(coords)) for name, shape, v, coords, _ in parts]
            ):
                return  # the usual case: native passes, every coordinate checked first
            payload = [
                (name, shape, v, torch.from_numpy(coo_to_flat(coords, shape, what=what)))
                for name, shape, v, coords, what in parts
            ]
            _embedded.pull_sparse_into(state, payload, mode=mode)

    def pack_parameters(self, model_weights: NDArrays, additional_parameters: SparseInfo) -> NDArrays:
        return self.parameter_packer.pack_parameters(model_weights, additional_parameters)

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, SparseInfo]:
        return self.parameter_packer.unpack_parameters(packed_parameters)


class DynamicLayerExchanger:
    """Whole layers picked by a layer selection function (FL4Health's class of the same name).

    The functions of :class:`LayerSelectionFunctionConstructor` and ``select_scores_and_sample_masks``
    (paramsel's, or FL4Health's own) are applied by the service; any other
    ``(model, initial_model) -> (arrays, names)`` function is simply called, as FL4Health calls it.
    Pulls are applied in this process by the engine the server runs.

    As in FL4Health, ``layer_selection_function`` and ``parameter_packer`` are read when a call is
    made: assigning one takes effect at the next call. ``push_parameters`` goes through a subclass's
    own ``select_parameters``, as FL4Health's does.
    """

    _pull = staticmethod(_embedded.pull_layers)

    def __init__(
        self,
        layer_selection_function: Callable[..., Any],
        *,
        target: str | None = None,
        connection: Connection | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    ) -> None:
        self.layer_selection_function = layer_selection_function
        self.parameter_packer = ParameterPackerWithLayerNames()
        self.client = Client(target=target, connection=connection, chunk_size_bytes=chunk_size_bytes)
        # Without target= or connection=, calls go where the selection function was built to call.
        self._default_client = self.client if target is None and connection is None else None

    def _served(self) -> tuple[LayerCriterion | None, Client]:
        """The criterion of the current selection function (None: it is called) and the client to use."""
        criterion, own = self._layer_criterion()
        client = self.client
        if own is not None and client is self._default_client:
            client = Client(connection=own, chunk_size_bytes=client.chunk_size)
        return criterion, client

    def _layer_criterion(self) -> tuple[LayerCriterion | None, Connection | None]:
        return layer_criterion(self.layer_selection_function)

    @property
    def criterion(self) -> DriftThreshold | DriftPercentage | FedPm | None:
        """The criterion the service applies for the current ``layer_selection_function``; None when
        that function is simply called."""
        return self._layer_criterion()[0]

    def select_parameters(
        self, model: nn.Module, initial_model: nn.Module | None = None
    ) -> tuple[NDArrays, list[str]]:
        criterion, client = self._served()
        if criterion is None:
            arrays, names = self.layer_selection_function(model, initial_model)
            return list(arrays), list(names)
        return select_layers(criterion, model, initial_model, client)

    def push_parameters(
        self, model: nn.Module, initial_model: nn.Module | None = None, config: Config | None = None
    ) -> NDArrays:
        """[arrays..., names], FL4Health's packed list."""
        if type(self).select_parameters is DynamicLayerExchanger.select_parameters:
            criterion, client = self._served()
            if isinstance(criterion, FedPm):  # the masks travel at 1 bit per entry
                return self.pack_parameters(*select_layers(criterion, model, initial_model, client))
            if criterion is not None and layers_served(criterion):
                result = client.push(
                    criterion, state_of(model), state_of(initial_model) if initial_model else None
                )
                return self.pack_parameters(
                    [to_numpy(t) for _, t in result.arrays], [name for name, _ in result.arrays]
                )
        return self.pack_parameters(*self.select_parameters(model, initial_model))

    def pull_parameters(self, parameters: NDArrays, model: nn.Module, config: Config | None = None) -> None:
        arrays, names = self.unpack_parameters(parameters)
        tensors = [(name, to_tensor(a)) for name, a in zip(names, arrays, strict=True)]
        with local_errors():
            load_changed(model, self._pull(model.state_dict(), tensors))

    def pack_parameters(self, model_weights: NDArrays, additional_parameters: list[str]) -> NDArrays:
        return self.parameter_packer.pack_parameters(model_weights, additional_parameters)

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, list[str]]:
        return self.parameter_packer.unpack_parameters(packed_parameters)


class FedPmExchanger(DynamicLayerExchanger):
    """FedPM: sends sampled masks of the score tensors; pulls probabilities back through the inverse sigmoid.

    ``seed`` makes the mask sampling repeatable (FL4Health's sampling is unseeded, as is the default).
    It is read at each call, like ``layer_selection_function`` (``select_scores_and_sample_masks``
    unless assigned), and applies to FedPM selections that carry no seed of their own.
    """

    _pull = staticmethod(_embedded.pull_fedpm)

    def __init__(
        self,
        *,
        seed: int | None = None,
        target: str | None = None,
        connection: Connection | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    ) -> None:
        FedPm(seed)  # refuses a seed the criterion cannot hold, now rather than at the first call
        super().__init__(
            select_scores_and_sample_masks,
            target=target,
            connection=connection,
            chunk_size_bytes=chunk_size_bytes,
        )
        self.seed = seed

    def _layer_criterion(self) -> tuple[LayerCriterion | None, Connection | None]:
        criterion, own = super()._layer_criterion()
        if isinstance(criterion, FedPm) and criterion.seed is None and self.seed is not None:
            criterion = FedPm(self.seed)
        return criterion, own
