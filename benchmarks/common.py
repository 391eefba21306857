"""Measurement helpers shared by the benchmarks: device choice, paired interleaved timing, ratios.

Every comparison runs its variants in one process, interleaved (A B C, B C A, ...), after warm-up, and is
reported as the median of the per-round ratios with their min and max: machine noise that hits one round
hits every variant of that round.
"""

import statistics
import time
from collections.abc import Callable

import torch

from remoe_recipe.config import MoEConfig
from remoe_recipe.model.args import ReMoEModelArgs
from remoe_recipe.model.moe import MoE
from remoe_recipe.routers import build_router


def build_moe_layer(
    router: str, dim: int, ffn_dim: int, num_experts: int, top_k: int = 1, granularity: int = 1,
    use_grouped_mm: bool = True,
):
    """One MoE layer with the registered router `router` (remoe_recipe.routers), built as the model
    builds its blocks: E * G experts of width ffn / G, k * G per token, the [moe] defaults otherwise."""
    args = ReMoEModelArgs(dim=dim, ffn_dim=ffn_dim, moe=MoEConfig(
        router=router, num_experts=num_experts, top_k=top_k, granularity=granularity,
    ))
    return MoE(dim, args.expert_dim, build_router(router, args), use_grouped_mm)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    variants: dict[str, Callable[[], None]], device: torch.device, warmup: int = 2, rounds: int = 5
) -> dict[str, list[float]]:
    """Seconds per call of each variant, `rounds` samples each, in rotating order."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def forward_backward(module, x) -> Callable[[], None]:
    """One timed call: forward, backward of a ones gradient, gradients cleared."""

    def fn():
        out = module(x)
        out.backward(torch.ones_like(out))
        module.zero_grad(set_to_none=True)
        x.grad = None

    return fn


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios (rounds are paired by index)."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_memory_bytes(fn: Callable[[], None], device: torch.device) -> tuple[str, int]:
    """(what was measured, bytes). CUDA: the allocator's peak above the level before `fn`. CPU has no
    allocator statistics: count the bytes autograd saves for backward (the activations), which is
    where routers differ; parameters and optimizer state are the same for ReMoE and TopK."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return "peak allocated", torch.cuda.max_memory_allocated(device) - base
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return "saved activations", sum(seen.values())


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
