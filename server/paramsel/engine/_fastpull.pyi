# The native module built from _fastpull.c (its opening comment says what each function does). The
# buffers are any C-contiguous objects with the buffer protocol (numpy arrays here); `flats` (in
# flatten) and `dense` must be writable. `threads` is how many OpenMP threads may share the work
# (torch.get_num_threads()).
from collections.abc import Sequence
from typing import Any

def flatten(coords: Any, shape: Sequence[int], flats: Any, threads: int, /) -> bool: ...
def write(dense: Any, itemsize: int, add_zero: bool, flats: Any, values: Any, threads: int, /) -> None: ...
