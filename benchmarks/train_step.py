"""Whole training step in stage III: ReMoE vs TopK vs dense, same config, seed and active parameters.

Each model takes full steps (forward, LM loss + its router loss, backward, gradient clipping, AdamW) on the
same batches. ReMoE is first brought to stage III (sparsity at 1 - k/E) by training it with a large
lambda_0 until its sparsity has stayed within 0.03 of the target for 3 steps; the adaptive controller keeps
running during the timed steps, as in a real run. Reported as ratios: step time, tokens/s, peak memory.
"""

import copy

import torch
import torch.nn.functional as F

from benchmarks.common import fmt_ratio, interleaved_times, median, peak_memory_bytes, print_table, ratio
from remoe_recipe.config import MoEConfig
from remoe_recipe.data import load_tokenizer
from remoe_recipe.model import ReMoETransformer, remoe_flavors
from remoe_recipe.router_loss import RouterLossWrapper
from remoe_recipe.routers import get_router
from remoe_recipe.routing_stats import StepRoutingStats


class Trainee:
    """A model with its optimizer and router loss, stepping like remoe_recipe.train does."""

    def __init__(self, router: str, flavor: str, vocab: int, seq_len: int, device, l1_init: float):
        spec = get_router(router)
        # lambda_0 only where the router reads it: the config check refuses keys set for another router.
        extra = {"l1_coeff_init": l1_init} if "l1_coeff_init" in spec.config_keys else {}
        args = copy.deepcopy(remoe_flavors()[flavor])
        args.vocab_size, args.max_seq_len, args.moe = vocab, seq_len, MoEConfig(router=router, **extra)
        torch.manual_seed(0)
        self.model = ReMoETransformer(args).to(device)
        with torch.no_grad():
            self.model.init_weights()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
        self.args, self.stats, self.steps = args, None, 0
        # The router's objective, as remoe_recipe.train builds it: ReMoE's adaptive lambda, TopK's aux loss.
        self.objective = spec.objective(args, device)
        self.loss_fn = lambda pred, labels: F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        if args.is_moe:
            self.stats = StepRoutingStats(args.n_layers, args.num_routed_experts, device)
            self.loss_fn = RouterLossWrapper(self.loss_fn, [self.model], self.objective, self.stats)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """One training step; the step's sparsity (a device tensor), None without experts."""
        if self.stats is not None:
            self.stats.reset()
        loss = self.loss_fn(self.model(inputs), labels) / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if self.stats is None:
            return None
        reduced = self.stats.reduce(None)
        self.objective.after_step(self.steps, reduced)
        return reduced.sparsity


def run(device, quick: bool = False) -> dict:
    on_gpu = device.type == "cuda"
    flavor, seq_len, batch = ("182M", 1024, 8) if on_gpu else ("debugmodel", 256 if not quick else 64, 8 if not quick else 4)
    tokenizer = load_tokenizer("builtin")
    vocab = 51200 if on_gpu else 4096
    from remoe_recipe.data.sources import builtin_documents

    ids = []
    for doc in builtin_documents("train"):
        ids += tokenizer.encode(doc["text"], add_eos=True)
        if len(ids) > 64 * batch * (seq_len + 1):
            break
    data = torch.tensor(ids, device=device)
    batches = [
        (data[i : i + batch * seq_len].view(batch, seq_len), data[i + 1 : i + 1 + batch * seq_len].view(batch, seq_len))
        for i in range(0, 60 * batch * seq_len, batch * seq_len)
    ]
    trainees = {r: Trainee(r, flavor, vocab, seq_len, device, l1_init=1e-2) for r in ("relu", "topk", "dense")}

    # Stage III for ReMoE: train until sparsity holds at the target.
    remoe, target, close, warm_steps = trainees["relu"], trainees["relu"].args.target_sparsity, 0, 0
    while close < 3 and warm_steps < 300:
        s = float(remoe.step(*batches[warm_steps % len(batches)]))
        close = close + 1 if abs(s - target) < 0.03 else 0
        warm_steps += 1
    cursor = {name: warm_steps for name in trainees}  # every model sees the same batch sequence
    sparsities = []

    def stepper(name):
        def fn():
            s = trainees[name].step(*batches[cursor[name] % len(batches)])
            cursor[name] += 1
            if name == "relu":  # ReMoE's sparsity while timed (TopK's is fixed at 1 - k/E)
                sparsities.append(float(s))
        return fn

    times = interleaved_times({n: stepper(n) for n in trainees}, device, warmup=2, rounds=4 if quick else 8)
    measured = {n: peak_memory_bytes(stepper(n), device) for n in trainees}
    memory_kind = measured["relu"][0]
    memory = {n: m[1] for n, m in measured.items()}
    tokens = batch * seq_len
    result = {
        "flavor": flavor, "seq_len": seq_len, "batch": batch, "device": device.type,
        "remoe_steps_to_stage3": warm_steps, "remoe_sparsity_during_timing": sum(sparsities) / len(sparsities),
        "target_sparsity": target,
        "step_seconds": {n: median(t) for n, t in times.items()},
        "tokens_per_second": {n: tokens / median(t) for n, t in times.items()},
        "memory_measure": memory_kind,
        "memory_bytes": memory,
        "step_time_ratio": {
            "remoe/topk": ratio(times["relu"], times["topk"]),
            "remoe/dense": ratio(times["relu"], times["dense"]),
            "topk/dense": ratio(times["topk"], times["dense"]),
        },
        "memory_ratio": {
            "remoe/topk": memory["relu"] / max(memory["topk"], 1),
            "remoe/dense": memory["relu"] / max(memory["dense"], 1),
            "topk/dense": memory["topk"] / max(memory["dense"], 1),
        },
    }
    rows = [
        [pair, fmt_ratio(r), f"{1 / r['median']:.3f}", f"{result['memory_ratio'].get(pair, float('nan')):.2f}"]
        for pair, r in result["step_time_ratio"].items()
    ]
    print_table(
        f"Training step in stage III ({flavor}, {batch}x{seq_len} tokens, {device.type}; ReMoE sparsity "
        f"{result['remoe_sparsity_during_timing']:.3f}, target {target:.3f}, reached after {warm_steps} steps)",
        ["ratio", "step time (median [min, max])", "tokens/s", memory_kind],
        rows,
    )
    return {"train_step": result}
