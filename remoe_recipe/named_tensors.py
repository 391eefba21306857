"""Named device tensors moved together: one all-reduce, or one host transfer, without offset arithmetic
at the call sites. Everything travels as fp32 (counts up to 2^24 exactly, more than any step's pairs
per expert per rank)."""

import torch
import torch.distributed as dist


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(iter(tensors.values())).device
    return torch.cat([t.detach().to(device, torch.float32).reshape(-1) for t in tensors.values()])


def _split(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts = flat.split([t.numel() for t in like.values()])
    return {name: part.view(t.shape) for (name, t), part in zip(like.items(), parts)}


def all_reduce(tensors: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Summed over the ranks of `group` in one collective (None: this process only)."""
    flat = _flat(tensors)
    if group is not None:
        dist.all_reduce(flat, group=group)
    return _split(flat, tensors)


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
    """One device-to-host copy: a 0-d tensor becomes a float, any other a flat list (row-major)."""
    flat = _flat(tensors).tolist()
    values, start = {}, 0
    for name, t in tensors.items():
        n = t.numel()
        values[name] = flat[start] if t.dim() == 0 else flat[start : start + n]
        start += n
    return values
