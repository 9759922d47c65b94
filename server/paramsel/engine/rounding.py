"""Casting float values to a narrower float dtype, rounded to nearest (ties to even) once.

torch casts float64 to float16 and bfloat16 through float32, so it rounds twice: a float64 just above
a float16 midpoint can first round onto the midpoint, then to even, below where one rounding puts it
(``1 + 2**-11 + 2**-40`` becomes 1.0 instead of ``1 + 2**-10``). :func:`round_float` rounds once, as IEEE
754 (and every language that converts binary64 to binary16 directly) does: from float64 it first
rounds to float32 *to odd* (towards zero, then the last bit set when anything was dropped), which keeps
enough of the dropped bits that torch's own correct float32 -> float16 / bfloat16 rounding then gives
the once-rounded result (float32 carries at least two more bits than either).
"""

from __future__ import annotations

import numpy as np
import torch

ROUNDING_SCRATCH_BYTES = 8 + 4 + 4
"""Per value rounded from float64 to a 2-byte float, beside the result: its float32 copy, that copy read
back as float64, and at most four bool masks at once."""


def round_float(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` cast to ``dtype``, rounded to nearest (ties to even) once; values that are not floats
    (integers, bool), or already of ``dtype``, come back as they are."""
    if not values.is_floating_point() or values.dtype == dtype:
        return values
    if values.dtype != torch.float64 or not dtype.is_floating_point or dtype.itemsize >= 4:
        # float64 -> float32 is one rounding, and so is anything from float32 or narrower (which torch
        # widens to float32 exactly first).
        return values.to(dtype)
    odd = _float32_rounded_to_odd(values.detach().cpu().contiguous().numpy())
    return torch.from_numpy(odd).to(dtype)


def _float32_rounded_to_odd(wide: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: the float32 next to ``wide`` towards zero, with its last
    significand bit set when that is not ``wide`` itself; exact values and NaN stay as they are, a
    magnitude past float32's largest becomes the largest (odd) one, infinities stay infinite."""
    with np.errstate(over="ignore"):  # past float32's range: inf, made the largest finite below
        narrow = wide.astype(np.float32)  # rounded to nearest
    back = narrow.astype(np.float64)
    inexact = back != wide
    inexact &= ~np.isnan(wide)  # NaN != NaN, but is no inexact result
    if not inexact.any():
        return narrow
    bits = narrow.view(np.int32)
    # Rounded away from zero: one step back towards it. In sign-magnitude, one less in the integer
    # that holds the bits is one step less in magnitude (inf becomes the largest finite value).
    # (Where inexact, ``wide`` is neither 0 nor NaN.)
    away = inexact & ((back > wide) == (wide > 0))
    bits[away] -= 1
    bits[inexact] |= 1
    return narrow
