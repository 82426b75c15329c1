"""Work spread over the processes of a job by item index: each process takes one contiguous share, and
rank 0 gathers the shares in order, so the result is the one a single process computes whenever each item
depends only on its index (as a sampled image's noise does: ddpm.ImageGenerator, and an image's features do:
the reference and evaluate stages)."""

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


def sharded_features(extract, rank: int, world_size: int):
    """`extract(extractor, images, **options)` (ddpm.metrics.extract_features: {name: (N, ...) tensor}) spread
    over the processes: each extracts the features of its share of the images, and rank 0 gets each tensor
    gathered in image order, the others None. Every process must call it on the same images, in the same order."""
    if world_size == 1:
        return extract

    def extract_share(extractor, images: torch.Tensor, **options) -> dict[str, torch.Tensor] | None:
        mine = share(len(images), rank, world_size)
        features = extract(extractor, images[mine.start:mine.stop], **options)
        gathered = {name: gather(part, world_size) for name, part in features.items()}
        return gathered if rank == 0 else None
    return extract_share
