"""Work spread over the processes of a job by item index: each process takes one contiguous share, and
rank 0 gathers the shares in order, so the result is the one a single process computes whenever each item
depends only on its index (as a sampled image's noise does: ddpm.ImageGenerator)."""

import torch


def share(num: int, rank: int, world_size: int) -> range:
    """The indices of `num` items that process `rank` of `world_size` takes: a contiguous block, the first
    `num % world_size` blocks one longer."""
    size, extra = divmod(num, world_size)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def gather(part: torch.Tensor, world_size: int) -> torch.Tensor | None:
    """On rank 0, every process's `part` concatenated in rank order (None on the others); with one
    process, `part` itself. Parts travel as CPU tensors through the process group's object gather, so
    shares of unequal length need no padding."""
    if world_size == 1:
        return part
    import torch.distributed as dist

    parts = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(part.cpu(), parts, dst=0)
    return torch.cat(parts) if parts is not None else None
