"""One MoE layer, forward + backward, against a dense SwiGLU FFN doing the same active FLOPs.

At the 182M flavor's dimensions (d = 768, ffn = 3072) the ReLU-routed layer runs at ReMoE's target
sparsity 1 - k/E (k = 1): E*G experts of width ffn/G, about k*G active per token. The dense reference
has width k*ffn, so both do the same expert FLOPs per token. Reported: achieved FLOP/s of both (expert
GEMM FLOPs only, 6 * pairs * 3 * d * width) and dense / MoE FLOP/s (target <= 1.3 at E=8, G=1), plus a
forward-time breakdown of the MoE layer: router, dispatch, experts, combine.

How the router hits the target sparsity without training: inputs carry a constant feature, and the
router's weight on it is set so that exactly the wanted quantile of logits is positive (a bias in
disguise; the layer itself has none).
"""

import time

import torch

from benchmarks.common import (
    build_moe_layer, fmt_ratio, forward_backward, interleaved_times, median, print_table, ratio, synchronize,
)
from remoe_recipe.model.model import FeedForward
from remoe_recipe.model.moe import MoE

DIM, FFN = 768, 3072


def calibrated_layer(num_experts: int, granularity: int, impl: str, tokens: int, device, top_k: int = 1):
    torch.manual_seed(0)
    moe = build_moe_layer("relu", DIM, FFN, num_experts, top_k, granularity, impl == "grouped_mm").to(device)
    with torch.no_grad():
        moe.init_weights(0.02, 0.02 / 5)
    x = torch.randn(tokens, DIM, device=device)
    x[:, 0] = 1.0
    with torch.no_grad():
        w = moe.router.gate.weight
        w[:, 0] = 0
        logits = x @ w.t()
        shift = torch.quantile(logits.flatten().float().cpu(), 1 - top_k / num_experts).item()
        w[:, 0] = -shift
    return moe, x.unsqueeze(0).requires_grad_()


def forward_breakdown(moe: MoE, x: torch.Tensor, device, repeats: int = 3) -> dict[str, float]:
    """Shares of the MoE forward: router | dispatch (pair list, gather, padding) | experts | combine."""
    marks: dict[str, float] = {}

    def mark(name):
        def hook(*_):
            synchronize(device)
            marks[name] = time.perf_counter()
        return hook

    handles = [
        moe.register_forward_pre_hook(mark("start")),
        moe.router.register_forward_hook(mark("router")),
        moe.experts.register_forward_pre_hook(mark("dispatch")),
        moe.experts.register_forward_hook(mark("experts")),
        moe.register_forward_hook(mark("combine")),
    ]
    parts = {"router": [], "dispatch": [], "experts": [], "combine": []}
    try:
        with torch.no_grad():
            for _ in range(repeats + 1):
                moe(x)
                prev = marks["start"]
                for name in parts:
                    parts[name].append(marks[name] - prev)
                    prev = marks[name]
    finally:
        for h in handles:
            h.remove()
    total = {name: median(v[1:]) for name, v in parts.items()}
    whole = sum(total.values())
    return {name: t / whole for name, t in total.items()}


def run(device, quick: bool = False) -> dict:
    on_gpu = device.type == "cuda"
    tokens = 16384 if on_gpu else (256 if quick else 1024)
    # E=128 at these dimensions is 0.9B parameters a layer (3.6 GB + 3.6 GB of gradients per variant):
    # GPU only; a 24 GB CPU machine runs E <= 32.
    experts = [8] if quick else ([8, 32, 128] if on_gpu else [8, 32])
    grans = [1] if quick else [1, 8]
    dense = FeedForward(DIM, FFN).to(device)
    with torch.no_grad():
        dense.init_weights(0.02, 0.02 / 5)
    results, rows = [], []
    for e in experts:
        for g in grans:
            layers = {impl: calibrated_layer(e, g, impl, tokens, device) for impl in ("grouped_mm", "loop")}
            x_dense = layers["grouped_mm"][1].detach().clone().requires_grad_()

            variants = {"dense": forward_backward(dense, x_dense)}
            variants.update({impl: forward_backward(m, x) for impl, (m, x) in layers.items()})
            times = interleaved_times(variants, device, warmup=1, rounds=3)
            moe, x = layers["grouped_mm"]
            with torch.no_grad():
                pairs = int((moe.router(x.reshape(-1, DIM)).mask).sum())
            dense_flops = 6 * tokens * 3 * DIM * FFN
            moe_flops = 6 * pairs * 3 * DIM * (FFN // g)
            entry = {
                "experts": e, "granularity": g, "tokens": tokens, "active_pairs_per_token": pairs / tokens,
                "dense_tflops": dense_flops / median(times["dense"]) / 1e12,
            }
            for impl in ("grouped_mm", "loop"):
                entry[f"{impl}_tflops"] = moe_flops / median(times[impl]) / 1e12
                # dense FLOP/s over MoE FLOP/s, paired per round
                entry[f"{impl}_flops_ratio"] = ratio(
                    [t / moe_flops for t in times[impl]], [t / dense_flops for t in times["dense"]]
                )
            entry["breakdown_grouped_mm"] = forward_breakdown(moe, x, device)
            results.append(entry)
            b = entry["breakdown_grouped_mm"]
            rows.append([
                e, g, f"{pairs / tokens:.2f}", f"{entry['dense_tflops']:.3f}",
                f"{entry['grouped_mm_tflops']:.3f}", fmt_ratio(entry["grouped_mm_flops_ratio"]),
                f"{entry['loop_tflops']:.3f}", fmt_ratio(entry["loop_flops_ratio"]),
                " / ".join(f"{100 * b[k]:.0f}" for k in ("router", "dispatch", "experts", "combine")),
            ])
            del layers, moe, x, variants
    print_table(
        f"MoE layer vs dense FFN of equal active FLOPs (d={DIM}, ffn={FFN}, {tokens} tokens, fwd+bwd, {device.type})",
        ["E", "G", "experts/token", "dense TFLOP/s", "grouped TFLOP/s", "dense/grouped", "loop TFLOP/s",
         "dense/loop", "fwd % router/dispatch/experts/combine"],
        rows,
    )
    return {"moe_layer": results}
