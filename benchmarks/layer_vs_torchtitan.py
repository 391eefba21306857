"""The recipe's MoE layer against torchtitan 0.2.2's own, and against a dense FFN, on one thread.

1. The recipe's TopK layer vs torchtitan's `MoE` with the same weights and the same routing: softmax ->
   top-1, no renormalisation, scores applied after the experts, no shared expert, grouped GEMM. Both run
   the same expert kernel: torchtitan's grouped function casts to bf16, so it is given the recipe's
   dtype-preserving grouped SwiGLU (fp32 on CPU; on a GPU both run bf16). Target: time ratio <= 1.05.
2. The ReLU-routed layer at the target sparsity (1 of E = 8 experts per token) vs a dense SwiGLU of width
   ffn, i.e. the same active FLOPs, at 4096 tokens on one thread. Target: dense FLOP/s / MoE FLOP/s <= 1.3.

Forward + backward, d = 768, ffn = 3072 (the 182M flavor), interleaved rounds after warm-up, reported as the
median of per-round ratios with [min, max].
"""

import torch

from benchmarks.common import (
    build_moe_layer, fmt_ratio, forward_backward, interleaved_times, median, print_table, ratio,
)
from benchmarks.moe_layer import DIM, FFN, calibrated_layer
from remoe_recipe.model.model import FeedForward
from remoe_recipe.model.moe import MoE, _grouped_swiglu


def torchtitan_twin(layer: MoE):
    """torchtitan's MoE with the recipe layer's weights and the paper's TopK routing."""
    from torchtitan.models.moe.moe import MoE as TorchtitanMoE, MoEArgs

    args = MoEArgs(
        num_experts=layer.num_experts, num_shared_experts=0, score_func="softmax", route_norm=False,
        top_k=layer.top_k, score_before_experts=False, load_balance_coeff=None, use_grouped_mm=True,
    )
    twin = TorchtitanMoE(args, dim=layer.experts.w1.shape[2], hidden_dim=layer.experts.w1.shape[1])
    with torch.no_grad():
        twin.router.gate.weight.copy_(layer.router.gate.weight)
        for w in ("w1", "w2", "w3"):
            getattr(twin.experts, w).copy_(getattr(layer.experts, w))
    return twin.to(layer.experts.w1.device)


def run(device, quick: bool = False) -> dict:
    import torchtitan.models.moe.moe as tt_moe

    from remoe_recipe.platform import enable_cpu_training

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
        enable_cpu_training()  # torchtitan's CPU permutation kernel
    tokens = 16384 if device.type == "cuda" else (1024 if quick else 4096)
    rounds = 3 if quick else 7
    saved = tt_moe._run_experts_grouped_mm, torch.histc
    tt_moe._run_experts_grouped_mm = _grouped_swiglu  # the same expert kernel for both layers
    if device.type == "cpu":  # torchtitan counts experts with histc on integers, which only CUDA has
        torch.histc = lambda t, **kw: saved[1](t.float(), **kw).to(t.dtype)
    try:
        torch.manual_seed(0)
        recipe = build_moe_layer("topk", DIM, FFN, 8, 1).to(device)
        with torch.no_grad():
            recipe.init_weights(0.02, 0.02 / 5)
        twin = torchtitan_twin(recipe)
        x = torch.randn(1, tokens, DIM, device=device)
        with torch.no_grad():
            agree = ((recipe(x) - twin(x)).abs().max() / twin(x).abs().max()).item()
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        t = interleaved_times(
            {"recipe": forward_backward(recipe, xr), "torchtitan": forward_backward(twin, xt)}, device, 2, rounds
        )
        vs_torchtitan = {
            "tokens": tokens, "output_max_rel_diff": agree,
            "seconds": {k: median(v) for k, v in t.items()},
            "time_ratio_recipe_over_torchtitan": ratio(t["recipe"], t["torchtitan"]),
        }

        moe, xm = calibrated_layer(8, 1, "grouped_mm", tokens, device)
        dense = FeedForward(DIM, FFN).to(device)
        with torch.no_grad():
            dense.init_weights(0.02, 0.02 / 5)
        xd = xm.detach().clone().requires_grad_()
        t2 = interleaved_times(
            {"moe": forward_backward(moe, xm), "dense": forward_backward(dense, xd)}, device, 1, rounds
        )
        with torch.no_grad():
            pairs = int(moe.router(xm.reshape(-1, DIM)).mask.sum())
        moe_flops, dense_flops = 6 * pairs * 3 * DIM * FFN, 6 * tokens * 3 * DIM * FFN
        vs_dense = {
            "tokens": tokens, "active_experts_per_token": pairs / tokens,
            "dense_over_moe_flops_per_s": ratio(
                [s / moe_flops for s in t2["moe"]], [s / dense_flops for s in t2["dense"]]
            ),
        }
    finally:
        tt_moe._run_experts_grouped_mm, torch.histc = saved
        torch.set_num_threads(threads)
    where = f"{device.type}, {'1 thread' if device.type == 'cpu' else torch.cuda.get_device_name()}"
    print_table(
        f"MoE layer: the recipe's vs torchtitan's, and vs a dense FFN (d={DIM}, ffn={FFN}, E=8, {tokens} tokens, "
        f"fwd+bwd, {where})",
        ["comparison", "ratio, median [min, max]", "target"],
        [
            ["recipe TopK time / torchtitan MoE time (same weights)",
             fmt_ratio(vs_torchtitan["time_ratio_recipe_over_torchtitan"]), "<= 1.05"],
            [f"dense FLOP/s / ReMoE layer FLOP/s ({pairs / tokens:.2f} experts/token)",
             fmt_ratio(vs_dense["dense_over_moe_flops_per_s"]), "<= 1.3"],
        ],
    )
    return {"layer_vs_torchtitan": vs_torchtitan, "layer_vs_dense_one_thread": vs_dense}
