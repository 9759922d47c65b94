"""Applying payloads that come back from the aggregator to a model's declared layout.

Every pull returns ``{name: tensor}`` in the model's dtype and shape, in payload order, leaving its
inputs untouched; loading the tensors into the model (strictly, as FL4Health does) is the caller's
business.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from .errors import InvalidArgument
from .state import State, TensorSpec
from .topk import SparseTensor


class PullMode(enum.Enum):
    """How a sparse payload is applied to a tensor."""

    REPLACE = "replace"
    """FL4Health's pull: the tensor becomes the densified COO tensor, coordinates not sent become 0."""
    SCATTER = "scatter"
    """Opt-in: only the sent coordinates are written; the rest keep the current model's values."""
    ADD = "add"
    """Opt-in: the payload is an update, added to the current model's values: base + densified payload
    (repeats summed in the values' dtype, the sum cast to the model's dtype, added in it)."""


def pull_sparse(
    model: Sequence[TensorSpec],
    payload: Sequence[SparseTensor],
    *,
    mode: PullMode = PullMode.REPLACE,
    base: State | None = None,
) -> dict[str, torch.Tensor]:
    """Densify each sparse tensor; duplicate positions are summed, as ``to_dense()`` sums them.

    ``base`` (the current model's tensors) is required by SCATTER and ADD and ignored by REPLACE.
    """
    specs = _specs_for(model, [(item.name, item.shape) for item in payload])
    pulled: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for item in payload:
            spec = specs[item.name]
            positions, increasing = _checked_positions(item, _numel(spec.shape))
            if mode is PullMode.REPLACE:
                pulled[item.name] = _densified(spec, item.values.detach(), positions)
            elif mode is PullMode.ADD:
                base_tensor = _base_tensor(base, spec)
                pulled[item.name] = _added(spec, base_tensor, item.values.detach(), positions)
            else:
                base_tensor = _base_tensor(base, spec)
                pulled[item.name] = _scatter(spec, base_tensor, item.values.detach(), positions, increasing)
    return pulled


def pull_layers(
    model: Sequence[TensorSpec], payload: Sequence[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Each named tensor is replaced by the payload tensor, cast to the model's dtype.

    When the dtype already matches, the result is the payload tensor itself (no copy).
    """
    specs = _specs_for(model, [(name, tuple(tensor.shape)) for name, tensor in payload])
    return {name: tensor.detach().to(specs[name].dtype) for name, tensor in payload}


def pull_fedpm(
    model: Sequence[TensorSpec], payload: Sequence[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Each named score tensor becomes the inverse sigmoid of the aggregated mask probability.

    Computed as ``-torch.log(1 / x - 1)`` on the payload tensor, as FL4Health does (integer x divides
    to float32; probabilities 0 and 1 give -inf and +inf), then cast to the model's dtype.
    """
    specs = _specs_for(model, [(name, tuple(tensor.shape)) for name, tensor in payload])
    with torch.no_grad():
        return {name: (-torch.log(1 / x.detach() - 1)).to(specs[name].dtype) for name, x in payload}


def _specs_for(
    model: Sequence[TensorSpec], entries: Sequence[tuple[str, tuple[int, ...]]]
) -> dict[str, TensorSpec]:
    """Check payload names and shapes against the model; return the model's specs by name."""
    specs = {spec.name: spec for spec in model}
    seen: set[str] = set()
    for name, shape in entries:
        if name in seen:
            raise InvalidArgument(f"payload names tensor {name!r} more than once")
        seen.add(name)
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(f"payload names tensor {name!r} that the model does not have")
        if tuple(shape) != tuple(spec.shape):
            raise InvalidArgument(
                f"payload tensor {name!r} has shape {tuple(shape)}, "
                f"but the model's tensor has shape {tuple(spec.shape)}"
            )
    return specs


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _checked_positions(item: SparseTensor, numel: int) -> tuple[torch.Tensor, bool]:
    """The positions as int64, checked against ``numel``, and whether they strictly increase."""
    values, positions = item.values, item.positions
    if values.dim() != 1 or positions.dim() != 1:
        raise InvalidArgument(f"sparse tensor {item.name!r}: values and positions must be 1-D")
    if values.numel() != positions.numel():
        raise InvalidArgument(
            f"sparse tensor {item.name!r} has {values.numel()} values but {positions.numel()} positions"
        )
    if positions.dtype.is_floating_point or positions.is_complex() or positions.dtype == torch.bool:
        raise InvalidArgument(
            f"sparse tensor {item.name!r}: positions must be integers, not {positions.dtype}"
        )
    positions = positions.detach().to(device="cpu", dtype=torch.int64)
    flat = positions.numpy()
    # numpy's comparison of neighbours is several times faster than torch's here.
    increasing = flat.size < 2 or bool((flat[1:] > flat[:-1]).all())
    if flat.size:
        # Increasing positions are in range when their ends are; others need a pass for both bounds.
        low, high = (int(flat[0]), int(flat[-1])) if increasing else map(int, torch.aminmax(positions))
        bad = low if low < 0 else high if high >= numel else None
        if bad is not None:
            raise InvalidArgument(
                f"sparse tensor {item.name!r} has position {bad}, "
                f"outside [0, {numel}) for its shape {tuple(item.shape)}"
            )
    return positions, increasing


def _densified(spec: TensorSpec, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The dense tensor of sparse entries (repeats summed) in the model's dtype. A function of its own,
    so that the densified tensor in the values' dtype is freed before the next tensor's is built (the
    server reserves one at a time; see :mod:`paramsel.engine.budget`)."""
    dense = torch.zeros(_numel(spec.shape), dtype=values.dtype)
    dense.index_put_((positions,), values, accumulate=True)
    return dense.reshape(spec.shape).to(spec.dtype)


def _base_tensor(base: State | None, spec: TensorSpec) -> torch.Tensor:
    tensor = None if base is None else base.get(spec.name)
    if tensor is None:
        raise InvalidArgument(
            f"a scatter or add pull needs the current value of tensor {spec.name!r} in base"
        )
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise InvalidArgument(
            f"base tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
            f"but the model declares {spec.dtype} {spec.shape}"
        )
    return tensor.detach()


def _added(
    spec: TensorSpec, base: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """base + the densified payload (see :attr:`PullMode.ADD`), the sum written over the densified
    tensor: base + 0 everywhere nothing was sent, as the formula says (-0.0 there becomes +0.0)."""
    dense = _densified(spec, values, positions)  # a new tensor, this function's own
    return torch.add(base, dense, out=dense)


def _scatter(
    spec: TensorSpec, base: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, increasing: bool
) -> torch.Tensor:
    flat = base.reshape(-1).clone()
    if not increasing:
        # Repeated positions: sum them in the values' dtype first, as REPLACE's densify would.
        positions, inverse = torch.unique(positions, return_inverse=True)
        values = torch.zeros(positions.numel(), dtype=values.dtype).index_add_(0, inverse, values)
    flat[positions] = values.to(spec.dtype)
    return flat.reshape(spec.shape)


_BLOCK_BYTES = 1 << 19
"""Bytes of a tensor :func:`_replace_in_blocks` zeroes and fills at a time: a block stays in the core's
cache between the two, so the tensor is written to memory once (zeroing it whole, then scattering into
it, went over it twice)."""


def _replace_in_blocks(
    target: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, add_zero: bool
) -> bool:
    """REPLACE's write of strictly increasing, in-range ``positions`` (``values`` in the target's dtype)
    into a contiguous ``target``: block by block, zero the block, then write the values that fall in it,
    plus 0 when ``add_zero`` (a -0.0 becomes +0.0, as densifying gives it: the values' share of a block is
    still in cache; torch's own add here would start its OpenMP threads, which spin on after it and
    slowed this pull's numpy threads by half). False (nothing written) when numpy cannot view the
    tensor (not on the CPU, or bfloat16)."""
    try:
        dense = target.detach().view(-1).numpy()
        sent = values.numpy()
    except (TypeError, RuntimeError):
        return False
    flat = positions.numpy()
    zero = dense.dtype.type(0)
    block = max(1, _BLOCK_BYTES // max(1, dense.itemsize))
    starts = np.arange(0, dense.size + block, block, dtype=np.int64)
    # Positions increase, so each block's share of them is one slice, found by binary search.
    edges = np.searchsorted(flat, starts).tolist()
    bounds = starts.tolist()

    def fill(first: int, last: int) -> None:  # blocks [first, last)
        for b in range(first, last):
            dense[bounds[b] : bounds[b + 1]] = 0
            low, high = edges[b], edges[b + 1]
            if high > low:
                dense[flat[low:high]] = sent[low:high] + zero if add_zero else sent[low:high]

    in_parallel(len(bounds) - 1, fill)
    return True


_MIN_SHARE = 16
"""Fewest items a thread of :func:`in_parallel` takes on."""

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _shared_pool() -> ThreadPoolExecutor:
    """The process's threads for :func:`in_parallel`, started at the first use and kept (a pool per call
    spent a fifth of a 50M pull starting threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="paramsel-pull")
        return _pool


_forked = False
"""True in a process forked from the one that imported this module (see :func:`_native_threads`)."""


def _forget_pool() -> None:
    """In a forked child: the parent's threads are not there, so a new pool is started when needed."""
    global _pool, _pool_lock, _forked
    _pool, _pool_lock, _forked = None, threading.Lock(), True


def _native_threads() -> int:
    """The threads the native module may use: torch's, but one in a forked child. GNU OpenMP, whose
    threads the module shares with torch, is not fork-safe: a child whose parent has run a parallel
    region waits forever in its first one (torch's own operations there do too, unless the child
    sets one thread, as torch's DataLoader workers do); one thread never starts the team."""
    return 1 if _forked else torch.get_num_threads()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def in_parallel(count: int, work: Callable[[int, int], None]) -> None:
    """``work(first, last)`` over ``range(count)`` cut into contiguous shares, one per thread, as many
    threads as torch uses (``torch.get_num_threads()``) while each has at least :data:`_MIN_SHARE`
    items: the calling thread takes the first share, the process's pool the others. numpy lets go of
    the GIL in the work's array operations, so the shares run side by side. Returns once every share
    has ended; raises the first failing share's error."""
    shares = max(1, min(torch.get_num_threads(), count // _MIN_SHARE))
    if shares == 1:
        work(0, count)
        return
    cuts = [count * i // shares for i in range(shares + 1)]
    others = [_shared_pool().submit(work, first, last) for first, last in pairwise(cuts[1:])]
    error: BaseException | None = None
    try:
        work(cuts[0], cuts[1])
    except BaseException as err:  # the other shares still write: wait for them before raising
        error = err
    for share in others:
        try:
            share.result()
        except BaseException as err:
            error = error or err
    if error is not None:
        raise error


def pull_sparse_into(
    targets: State, payload: Sequence[SparseTensor], *, mode: PullMode = PullMode.REPLACE
) -> list[str]:
    """``pull_sparse`` written straight into ``targets`` (the model's own tensors); returns the names.

    Same result as ``pull_sparse`` followed by a copy, without the dense temporaries: when a tensor's
    positions strictly increase (no duplicates to sum, the normal case), its values are cast and
    written in place - on a zeroed tensor for REPLACE. Anything else (ADD always) takes the general
    path.
    """
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in targets.items()]
    _specs_for(specs, [(item.name, item.shape) for item in payload])
    # Every check comes before the first write, so a refused payload leaves the model as it was.
    checked = [
        (item, targets[item.name], *_checked_positions(item, targets[item.name].numel())) for item in payload
    ]
    with torch.no_grad():
        for item, target, positions, increasing in checked:
            if increasing and target.is_contiguous() and mode is not PullMode.ADD:
                values = item.values.detach()
                # REPLACE densifies by adding the values into zeros, as FL4Health's to_dense() does: a -0.0
                # sent arrives as +0.0 (x + 0 is x for any other x), in the values' dtype, then cast.
                densify = mode is PullMode.REPLACE and (values.is_floating_point() or values.is_complex())
                if densify and values.dtype != target.dtype:
                    values, densify = values + 0, False  # done: the cast comes after
                values = values.to(device=target.device, dtype=target.dtype)
                if mode is PullMode.REPLACE and _replace_in_blocks(target, values, positions, densify):
                    continue
                if densify:
                    values = values + 0
                if mode is PullMode.REPLACE:
                    target.zero_()
                target.view(-1).index_copy_(0, positions.to(target.device), values)
            else:
                general = SparseTensor(item.name, item.shape, item.values.cpu(), positions.cpu())
                base = {item.name: target.cpu()}
                target.copy_(pull_sparse(specs, [general], mode=mode, base=base)[item.name])
    return [item.name for item in payload]


try:
    from . import _fastpull  # built from _fastpull.c when the distribution is installed
except ImportError:  # installed without a C compiler: pulls run numpy's passes
    _fastpull = None  # type: ignore[assignment]

_NATIVE_DTYPES = frozenset(
    {torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}
)
"""The dtypes :func:`replace_coo_into` writes: the floats it adds 0 to in C (float32, float64) and the
ones written as they are."""


@dataclass(frozen=True)
class CooTensor:
    """A sparse tensor in FL4Health's layout: ``coords`` is (nnz, len(shape)) int64, a coordinate per row,
    ``values`` the 1-D values in the same order."""

    name: str
    shape: tuple[int, ...]
    values: torch.Tensor
    coords: torch.Tensor


def replace_coo_into(targets: State, payload: Sequence[CooTensor]) -> bool:
    """REPLACE's pull of FL4Health's coordinates straight into ``targets`` (the model's own tensors), by
    the native module (:mod:`paramsel.engine._fastpull`): every tensor's coordinates are read once and
    checked (each inside its axis, their flat row-major positions strictly increasing) into 4-byte flat
    positions, then each tensor is written from those (zeros, the values over them, floats plus 0 as
    densifying gives them), a cache-sized span at a time. A 0-d tensor gets its one value (or 0). True
    when the payload was written.

    False, with nothing written, when the native module was not built or the payload is not its case:
    names or shapes that do not match the model, values in another dtype than the model's, a dtype it
    does not write (float16, bfloat16, complex), a tensor off the CPU or not contiguous, a coordinate
    out of range, repeated or out of order positions. The caller then flattens the coordinates and calls
    :func:`pull_sparse_into`, which handles or refuses each of those, with its own messages.

    Why native: the same work in numpy is separate passes over the tensor and the (nnz, ndim) int64
    coordinates (range check, flattening, order check, zeroing and scattering), each compute-bound on
    strided columns; together they took 2.2 to 4.4 times a plain ``copy_`` of the tensors written
    (BENCHMARKS.md, target 8), and no library does the checked conversion and scatter in one pass
    (torch's sparse ``to_dense()``, FL4Health's pull, is slower still). The module's threads are
    torch's own OpenMP threads (see _fastpull.c): a pool of ours had to share the cores with them while
    they spin on after a torch operation.
    """
    if _fastpull is None:
        return False
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in targets.items()]
    try:
        _specs_for(specs, [(item.name, tuple(item.shape)) for item in payload])
    except InvalidArgument:
        return False
    writes = [_native_write(targets[item.name], item) for item in payload]
    if any(write is None for write in writes):
        return False
    with torch.no_grad():
        for write in writes:
            assert write is not None
            write()
    return True


def _native_write(target: torch.Tensor, item: CooTensor) -> Callable[[], None] | None:
    """The write of ``item`` into ``target`` once its coordinates have been checked; None when the
    native pass does not take it (see :func:`replace_coo_into`)."""
    values, coords, shape = item.values.detach(), item.coords, tuple(int(d) for d in item.shape)
    if (
        target.device.type != "cpu"
        or values.device.type != "cpu"
        or coords.device.type != "cpu"
        or not target.is_contiguous()
        or target.dtype not in _NATIVE_DTYPES
        or values.dtype != target.dtype
        or values.dim() != 1
        or coords.dtype != torch.int64
        or coords.dim() != 2
        or coords.shape != (values.numel(), len(shape))
    ):
        return None
    add_zero = target.dtype in (torch.float32, torch.float64)
    if not shape:  # a 0-d tensor (a BatchNorm's num_batches_tracked): its one value, or 0
        if values.numel() > 1:
            return None  # repeated: numpy's passes sum them

        def write_scalar() -> None:
            if values.numel() == 0:
                target.zero_()
            else:
                target.copy_(values.reshape(()) + 0 if add_zero else values.reshape(()))

        return write_scalar
    rows = np.ascontiguousarray(coords.numpy())
    sent = np.ascontiguousarray(values.numpy())
    # The flat positions, 4 bytes each where they fit: the write reads them instead of the coordinates.
    flats = np.empty(rows.shape[0], dtype=np.uint32 if target.numel() <= 1 << 32 else np.uint64)
    if not _fastpull.flatten(rows, shape, flats, _native_threads()):
        return None

    def write() -> None:
        dense = target.detach().view(-1).numpy()
        _fastpull.write(dense, dense.itemsize, add_zero, flats, sent, _native_threads())

    return write
