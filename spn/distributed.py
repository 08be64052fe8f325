"""Data-parallel RAT-SPNs: EM statistics summed over processes (every replica takes the same EM step), and
one model broadcast from a rank (the same initialisation everywhere)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def _all_gather_sparse(t: Tensor) -> Tensor:
    """Sum of a sparse COO tensor over all ranks (all-gather of padded indices and values, then coalesce)."""
    t = t.coalesce()
    world = dist.get_world_size()
    nnz = torch.tensor([t.indices().shape[1]], device=t.device)
    sizes = [torch.zeros_like(nnz) for _ in range(world)]
    dist.all_gather(sizes, nnz)
    longest = int(max(int(s) for s in sizes))
    idx = torch.zeros(t.indices().shape[0], longest, dtype=torch.long, device=t.device)
    val = torch.zeros((longest, *t.values().shape[1:]), dtype=t.values().dtype, device=t.device)
    idx[:, : int(nnz)] = t.indices()
    val[: int(nnz)] = t.values()
    all_idx = [torch.zeros_like(idx) for _ in range(world)]
    all_val = [torch.zeros_like(val) for _ in range(world)]
    dist.all_gather(all_idx, idx)
    dist.all_gather(all_val, val)
    # concatenate in rank order so every rank builds (and coalesces) the very same tensor
    indices = torch.cat([i[:, : int(s)] for i, s in zip(all_idx, sizes)], dim=1)
    values = torch.cat([v[: int(s)] for v, s in zip(all_val, sizes)], dim=0)
    return torch.sparse_coo_tensor(indices, values, t.shape, check_invariants=False).coalesce()


def all_reduce_stats(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sums every statistic over the default process group (dense: all-reduce; sparse: all-gather)."""
    out = {}
    for key in sorted(stats):  # the same order on every rank
        value = stats[key]
        if value.is_sparse:
            out[key] = _all_gather_sparse(value)
        else:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            out[key] = value
    return out


def is_distributed() -> bool:
    """Whether torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_stats_reducer() -> Callable[[dict[str, Tensor]], dict[str, Tensor]] | None:
    """`all_reduce_stats` when torch.distributed runs with more than one process, else None."""
    return all_reduce_stats if is_distributed() else None


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes ``src``'s parameters and buffers (e.g. after a data-driven initialisation).

    Parameters are received into a copy and written in place: the write bumps their version counter,
    which `RatSpn`'s cache of derived tensors keys on (a collective writing into ``param.data`` would
    leave a stale cache behind). Nothing is derived from buffers, so they are received in place.
    """
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)
    for param in module.parameters():
        received = param.detach().clone()
        dist.broadcast(received, src=src)
        param.copy_(received)
