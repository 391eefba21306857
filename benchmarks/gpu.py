"""The MoE recipe as users run it on one GPU: the 182M E=8 ReMoE and TopK training step, and the MoE layer.

    benchmarks/gpu.sh                 # on a GPU machine; writes benchmarks/results/<date>-gpu.json
    python -m benchmarks.gpu --dry    # CPU smoke test of the same code at toy sizes

Training step (`train_step`): the 182M flavor at E = 8, k = 1, the paper's micro-batch (16 x 1024 tokens),
fp32 weights under bf16 autocast with fused AdamW and gradient clipping (torchtitan's one-GPU setup),
random token ids. Reported per model: tokens/s, MFU on active FLOPs (the measured active experts per
token, `flops_per_token`), peak allocated memory, and the host syncs of one whole step counted by
`torch.cuda.set_sync_debug_mode("warn")` (12 MoE layers). ReMoE runs twice: at its dense start (a fresh
router, about half the experts open), with `[moe] pair_chunk_size` auto and forced to chunks of T * k
pairs, and at stage-III sparsity (each
router's logits shifted by its 1 - k/E quantile, a bias in disguise, as in the moe_layer benchmark).
Eager, then compiled per block (`infra/compile.py`, inductor) if time allows.

MoE layer (`moe_layer`): d = 768, ffn = 3072, E = 8, 16384 tokens, bf16. The recipe's TopK layer against
torchtitan 0.2.2's own MoE layer with the same weights (softmax -> top-1, no renormalisation, scores after
the experts, grouped GEMM), forward + backward, interleaved; the host syncs of each layer; and two
identical steps of the ReLU layer under `torch.use_deterministic_algorithms(True)` give bitwise equal
gradients.
"""

import argparse
import copy
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import build_moe_layer, fmt_ratio, ratio
from remoe_recipe.config import MoEConfig
from remoe_recipe.model import ReMoETransformer, remoe_flavors
from remoe_recipe.model.moe import MoE
from remoe_recipe.router_loss import RouterLossWrapper
from remoe_recipe.routers import get_router
from remoe_recipe.routing_stats import StepRoutingStats

START = time.perf_counter()
# The routers this benchmark measures, by the names its results use.
LABELS = {"topk": "topk", "relu": "remoe"}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def count_syncs(fn) -> int:
    """Host syncs of `fn()`: the warnings of torch.cuda.set_sync_debug_mode("warn")."""
    if not torch.cuda.is_available():
        return -1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (not the one-time "Synchronization debug mode is a prototype ... synchronizing operations" notice)
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Model:
    """One model, stepping like remoe_recipe.train on one GPU."""

    def __init__(self, router, flavor, seq_len, vocab, device, compile_blocks: bool, pair_chunk_size: int = -1):
        args = copy.deepcopy(remoe_flavors()[flavor])
        args.vocab_size, args.max_seq_len = vocab, seq_len
        args.moe = MoEConfig(router=router, num_experts=8, top_k=1, pair_chunk_size=pair_chunk_size)
        torch.manual_seed(0)
        self.model = ReMoETransformer(args).to(device)
        with torch.no_grad():
            self.model.init_weights()
        if compile_blocks:
            from torchtitan.config.job_config import Compile

            from remoe_recipe.infra.compile import apply_compile

            apply_compile(self.model, Compile(enable=True, backend="inductor"))
        # lr = 0: the optimizer does all its work, but the routing stays where it was set (a fresh
        # router for the dense start, a calibrated one for stage III) over the timed steps.
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=0.0, weight_decay=0.01, fused=device.type == "cuda"
        )
        self.args, self.device, self.shifts, self.steps = args, device, [], 0
        self.stats = StepRoutingStats(args.n_layers, args.num_routed_experts, device)
        # The router's objective with the [moe] defaults, as remoe_recipe.train builds it (ReMoE: the
        # adaptive lambda from 1e-8; TopK: aux_loss_coeff 1e-2).
        self.objective = get_router(router).objective(args, device)
        lm = lambda pred, labels: F.cross_entropy(  # noqa: E731
            pred.flatten(0, 1).float(), labels.flatten(), reduction="sum"
        )
        self.loss_fn = RouterLossWrapper(lm, [self.model], self.objective, self.stats)

    def moe_layers(self):
        return [b.moe for b in self.model.layers.values() if b.moe_enabled]

    def calibrate_stage3(self, inputs) -> None:
        """Shift each ReLU router's logits by their (1 - k/E) quantile: stage-III sparsity."""
        quantiles = []

        def record(moe, args):  # on the (eager) MoE layer's input, outside any compiled graph
            logits = (args[0].reshape(-1, args[0].shape[-1]) @ moe.router.gate.weight.t()).float().flatten()
            sample = logits[torch.randperm(logits.numel(), device=logits.device)[: 1 << 22]]
            quantiles.append(torch.quantile(sample, self.args.target_sparsity))

        handles = [moe.register_forward_pre_hook(record) for moe in self.moe_layers()]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            self.model(inputs)
        for h in handles:
            h.remove()
        for moe, q in zip(self.moe_layers(), quantiles):
            shift = float(q)  # a constant in the compiled router's graph
            self.shifts.append(moe.router.gate.register_forward_hook(lambda m, a, out, s=shift: out - s))
        for moe in self.moe_layers():
            moe.pop_record()

    def step(self, inputs, labels) -> None:
        self.stats.reset()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            pred = self.model(inputs)
        loss = self.loss_fn(pred, labels) / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        reduced = self.stats.reduce(None)
        self.steps += 1
        self.objective.after_step(self.steps, reduced)  # device-only, as in remoe_recipe.train
        self.last = reduced


def peak_flops(device) -> float:
    if device.type != "cuda":
        return float("nan")
    from torchtitan.tools.utils import get_peak_flops

    return get_peak_flops(torch.cuda.get_device_name())


def train_step(device, dry: bool, compile_blocks: bool, budget_s: float) -> dict:
    flavor, seq_len, batch, vocab = ("debugmodel", 128, 2, 2048) if dry else ("182M", 1024, 16, 51200)
    steps = 2 if dry else 8
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (4, batch, seq_len + 1), generator=gen).to(device)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    results = {}
    cases = [("topk", ""), ("relu", "stage3"), ("relu", "dense_start"), ("relu", "dense_start_chunked")]
    for router, stage in cases:
        name = f"{LABELS[router]}{'_' + stage if stage else ''}"
        name += "_compiled" if compile_blocks else ""
        if time.perf_counter() - START > budget_s:
            log(f"skip {name}: time budget")
            continue
        log(f"{name}: building")
        # the chunked dense start forces what auto does on a device too small for the unchunked one
        m = Model(router, flavor, seq_len, vocab, device, compile_blocks, batch * seq_len if "chunked" in stage else -1)
        t0 = time.perf_counter()
        try:
            if stage == "stage3":
                m.calibrate_stage3(batches[0][0])
            for i in range(2):  # warm-up (compiles, if compiled)
                m.step(*batches[i % 4])
        except Exception as e:  # report it, keep the other cases
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
            log(f"{name} failed: {results[name]['error']}")
            continue
        sync(device)
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            sync(device)
            t = time.perf_counter()
            m.step(*batches[i % 4])
            sync(device)
            times.append(time.perf_counter() - t)
        active = float(m.last.active_experts_per_token)
        syncs = count_syncs(lambda: m.step(*batches[0]))
        tokens = batch * seq_len
        step_s = statistics.median(times)
        flops = m.args.flops_per_token(seq_len, active)
        results[name] = {
            "step_s_median": step_s, "step_s_min": min(times), "step_s_max": max(times),
            "tokens_per_s": tokens / step_s, "active_experts_per_token": active,
            "mfu_active": flops * tokens / step_s / peak_flops(device),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "host_syncs_per_step": syncs, "moe_layers": len(m.moe_layers()),
            "chunks_per_layer": m.moe_layers()[0].last_num_chunks, "warmup_s": warm_s,
        }
        r = results[name]
        log(f"{name}: {r['tokens_per_s']:,.0f} tok/s, step {step_s * 1e3:.1f} ms [{min(times) * 1e3:.1f}, "
            f"{max(times) * 1e3:.1f}], MFU(active) {100 * r['mfu_active']:.1f}%, active/token {active:.2f}, "
            f"peak {r['peak_memory_gib'] or 0:.1f} GiB, syncs/step {syncs} over {r['moe_layers']} MoE layers, "
            f"chunks {r['chunks_per_layer']}, warm-up {warm_s:.1f}s")
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _torchtitan_twin(layer: MoE, dim: int, hidden: int):
    from torchtitan.models.moe.moe import MoE as TorchtitanMoE, MoEArgs

    args = MoEArgs(
        num_experts=layer.num_experts, num_shared_experts=0, score_func="softmax", route_norm=False,
        top_k=layer.top_k, score_before_experts=False, load_balance_coeff=None, use_grouped_mm=True,
    )
    twin = TorchtitanMoE(args, dim=dim, hidden_dim=hidden)
    twin.load_state_dict(layer.state_dict(), strict=False)
    with torch.no_grad():
        twin.router.gate.weight.copy_(layer.router.gate.weight)
        for w in ("w1", "w2", "w3"):
            getattr(twin.experts, w).copy_(getattr(layer.experts, w))
    return twin


def expert_parallel_syncs(device, dim, hidden, experts, x, g, dtype) -> dict:
    """Host syncs of a forward + backward with torchtitan's ExpertParallel on a one-rank ep mesh (the
    exchange runs, with its split sizes read on the host)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from torchtitan.distributed.expert_parallel import ExpertParallel

    from remoe_recipe.infra.expert_parallel import TrimmingExpertParallel

    if device.type != "cuda":
        return {}
    dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore(), device_id=torch.device("cuda", 0))
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("ep",))
        layers = {}
        for router in ("topk", "relu"):
            torch.manual_seed(0)
            layers[f"recipe_{router}"] = build_moe_layer(router, dim, hidden, experts)
            layers[f"recipe_{router}"].init_weights(0.02, 0.02 / 5)
        layers["torchtitan"] = _torchtitan_twin(layers["recipe_topk"], dim, hidden)
        counts = {}
        for name, layer in layers.items():
            layer = layer.to(device, dtype)
            style = TrimmingExpertParallel() if isinstance(layer, MoE) else ExpertParallel()
            parallelize_module(layer.experts, mesh, style)

            def fn(layer=layer):
                xi = x.detach().requires_grad_()
                (layer(xi) * g).sum().backward()
            fn()
            counts[name] = count_syncs(fn)
        return counts
    finally:
        dist.destroy_process_group()


def moe_layer(device, dry: bool) -> dict:
    dim, hidden, experts, tokens = (64, 128, 8, 512) if dry else (768, 3072, 8, 16384)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = build_moe_layer("topk", dim, hidden, experts)
    ours.init_weights(0.02, 0.02 / 5)
    twin = _torchtitan_twin(ours, dim, hidden)
    ours, twin = ours.to(device, dtype), twin.to(device, dtype)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    g = torch.randn_like(x)

    def run(layer):
        def fn():
            xi = x.detach().requires_grad_()
            (layer(xi) * g).sum().backward()
        return fn

    if device.type == "cpu":  # torchtitan on CPU: its permutation kernel's CPU twin, histc on floats
        from remoe_recipe.platform import enable_cpu_training

        enable_cpu_training()
        histc = torch.histc
        torch.histc = lambda t, **kw: histc(t.float(), **kw).to(t.dtype)
    with torch.no_grad():
        a, b = ours(x), twin(x)
        agree = (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
    fns = {"recipe_topk": run(ours), "torchtitan": run(twin)}
    rounds = 3 if dry else 20
    for fn in fns.values():
        fn(), fn()
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    relu = build_moe_layer("relu", dim, hidden, experts)
    relu.init_weights(0.02, 0.02 / 5)
    relu = relu.to(device, dtype)
    syncs = {k: count_syncs(fn) for k, fn in {**fns, "recipe_relu": run(relu)}.items()}

    def grads_of_step():
        relu.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        (relu(xi) * g).sum().backward()
        return [xi.grad] + [p.grad for p in relu.parameters()]

    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads_of_step(), grads_of_step()
    finally:
        torch.use_deterministic_algorithms(False)
    try:
        syncs_ep = expert_parallel_syncs(device, dim, hidden, experts, x, g, dtype)
    except Exception as e:  # report it, keep the rest
        syncs_ep = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    result = {
        "tokens": tokens, "dim": dim, "hidden": hidden, "experts": experts, "dtype": str(dtype),
        "output_rel_diff_recipe_vs_torchtitan": agree,
        "ms_median": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "time_ratio_recipe_over_torchtitan": ratio(times["recipe_topk"], times["torchtitan"]),
        "host_syncs_fwd_bwd": syncs,
        "host_syncs_fwd_bwd_expert_parallel_1_rank": syncs_ep,
        "deterministic_bitwise_equal_grads": all(torch.equal(p, q) for p, q in zip(first, second)),
    }
    log(f"moe layer: recipe TopK / torchtitan time {fmt_ratio(result['time_ratio_recipe_over_torchtitan'])} "
        f"({result['ms_median']}), output rel diff {agree:.2e}, syncs {syncs}, with EP (1 rank) {syncs_ep}, "
        f"deterministic grads equal: "
        f"{result['deterministic_bitwise_equal_grads']}")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="toy sizes (a CPU smoke test of this script)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--budget", type=float, default=330.0, help="seconds after which further cases are skipped")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dry": a.dry,
    }
    log(f"{meta}")
    results = {"meta": meta}
    out = a.out or Path(__file__).parent / "results" / f"{meta['date'][:10]}-{device.type}-gpu-bench.json"

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))

    results["moe_layer"] = moe_layer(device, a.dry)
    save()
    results["train_step"] = train_step(device, a.dry, False, a.budget)
    save()
    if not a.no_compile:
        try:
            results["train_step_compiled"] = train_step(device, a.dry, True, a.budget)
        except Exception as e:  # report, keep the eager numbers
            log(f"compiled step failed: {type(e).__name__}: {str(e)[:2000]}")
            results["train_step_compiled"] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        save()
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
