"""The tensor-parallel group that the collective ops (`ops.all_reduce`, `ops.all_gather`) run over.

Like the forward context, it is set by the runtime around the work of one step (the forward, the
logits) and read by the ops, so model code never sees it. No group means one rank: the
collectives are identities, and a model runs unsharded.
"""

from __future__ import annotations

import contextlib

_group = None  # a torch.distributed process group (ProcessGroupGloo / ProcessGroupNCCL), or None
# a faster all-reduce over the same group for the tensors it `takes` (small ones on CUDA: see
# runtime/tensor_parallel.py, OneShotAllReduce), or None; the rest go through the group's own
_small_all_reduce = None


def get_tensor_parallel_group():
    return _group


def get_small_all_reduce():
    return _small_all_reduce


def tensor_parallel_world_size() -> int:
    return 1 if _group is None else _group.size()


def tensor_parallel_rank() -> int:
    return 0 if _group is None else _group.rank()


@contextlib.contextmanager
def tensor_parallel_group(group, small_all_reduce=None):
    """Run the body's collectives over `group` (None: a single rank); `small_all_reduce(x)`, when
    given, sums over the group every x that `small_all_reduce.takes(x)`."""
    global _group, _small_all_reduce
    prev = _group, _small_all_reduce
    _group, _small_all_reduce = group, small_all_reduce
    try:
        yield
    finally:
        _group, _small_all_reduce = prev
