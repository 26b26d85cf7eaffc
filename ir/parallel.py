"""The tensor-parallel group that the collective ops (`ops.all_reduce`, `ops.all_gather`) run over.

Like the forward context, it is set by the runtime around the work of one step (the forward, the
logits) and read by the ops, so model code never sees it. No group means one rank: the
collectives are identities, and a model runs unsharded.
"""

from __future__ import annotations

import contextlib

_group = None  # a torch.distributed process group (ProcessGroupGloo / ProcessGroupNCCL), or None
# group -> a faster all-reduce for the tensors it `takes` (small ones on CUDA: see
# runtime/tensor_parallel.py, OneShotAllReduce); the rest go through the group's own all_reduce
_small_all_reduce: dict[int, object] = {}


def register_small_all_reduce(group, reduce) -> None:
    """`reduce(x)` -> the sum of x over `group`'s ranks (a new tensor) for every x `reduce.takes(x)`."""
    _small_all_reduce[id(group)] = reduce


def small_all_reduce(group):
    return _small_all_reduce.get(id(group))


def get_tensor_parallel_group():
    return _group


def tensor_parallel_world_size() -> int:
    return 1 if _group is None else _group.size()


def tensor_parallel_rank() -> int:
    return 0 if _group is None else _group.rank()


@contextlib.contextmanager
def tensor_parallel_group(group):
    """Run the body's collectives over `group` (None: a single rank)."""
    global _group
    prev, _group = _group, group
    try:
        yield
    finally:
        _group = prev
