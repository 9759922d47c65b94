# The native module built from _fastpull.c (its opening comment says what each function does). The
# buffers are any C-contiguous objects with the buffer protocol (numpy arrays here); `dense` must be
# writable. `threads` is how many OpenMP threads may share the work (torch.get_num_threads()).
from collections.abc import Sequence
from typing import Any

def check(coords: Any, shape: Sequence[int], threads: int, /) -> bool: ...
def write(
    dense: Any,
    itemsize: int,
    add_zero: bool,
    coords: Any,
    shape: Sequence[int],
    values: Any,
    threads: int,
    /,
) -> None: ...
