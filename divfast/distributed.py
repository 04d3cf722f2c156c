"""Pack metric states, all-reduce them once per dtype, unpack.

States are sums with identity zero, so the sum over ranks of per-rank sums is the sum over all data.
Evaluation shards the data as ``rank::world`` (DistributedSampler pads by duplicating samples, which
would count them twice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_indices(n: int, rank: int, world: int) -> range:
    """The samples of ``rank`` among ``world`` processes: ``rank::world``, no padding."""
    if not 0 <= rank < world:
        raise ValueError(f"`rank` must be in [0, world={world}), got {rank}")
    return range(rank, n, world)


def all_reduce_sum(states: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """Sums every tensor of ``states`` over the processes of ``group`` with one all-reduce per dtype.

    Keys and shapes must agree on every rank. Returns new tensors; the input is not modified.
    """
    if not is_distributed():
        return {k: v.clone() for k, v in states.items()}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in sorted(states):
        by_dtype.setdefault(states[key].dtype, []).append(key)
    out: dict[str, torch.Tensor] = {}
    for dtype, keys in by_dtype.items():
        flat = torch.cat([states[k].reshape(-1) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for k in keys:
            size = states[k].numel()
            out[k] = flat[offset:offset + size].view_as(states[k]).clone()
            offset += size
    return out

