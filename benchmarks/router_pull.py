"""How hard a router's own objective pulls on the router weights, against the language-model loss.

    python -m benchmarks.router_pull RUN [RUN ...] [--batches 2] [--steps 100 600]

For every checkpoint RUN/checkpoint/step-N of a finished run: `--batches` training steps' worth of tokens
(the run's batch × sequence length, sequences cut from the training split at fixed random offsets), the
gradient on every layer's router weight of
- the language-model loss (mean cross-entropy per token), and
- the router term the trainer adds: λ_N × the mean over layers of Eq. 10 (ReMoE; λ_N is the `remoe/l1_coeff`
  the run logged at step N) or aux_loss_coeff × the summed Switch loss (TopK),
and prints per layer the norm ratio |grad penalty| / |grad LM|, their cosine, the share of tokens with no
active expert, the active experts per token and the mean gate of the active pairs. The gradients are the full
ones the optimizer sees (a layer's router also reaches later layers' terms through the residual stream). Both
losses enter the same AdamW update, so a ratio near 1 means the router's weights follow the penalty about as
much as the language model. docs/training-dynamics.md ("Why ReMoE is behind here") reads it. Runs on CPU (a
minute per checkpoint) or a GPU.
"""

import argparse
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from remoe_recipe.analysis.routing import load_model
from remoe_recipe.analysis.runs import read_run
from remoe_recipe.data import build_tiktoken_tokenizer, resolve_source
from remoe_recipe.preflight import load_config
from remoe_recipe.routers import get_router
from remoe_recipe.run_log import CONFIG_TOML


def checkpoint_steps(run: Path, folder: str) -> list[int]:
    steps = [int(m.group(1)) for p in (run / folder).glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    if not steps:
        raise SystemExit(f"{run / folder}: no step-N checkpoints (train with --checkpoint.enable)")
    return sorted(steps)


def training_sequences(config, count: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[count, seq_len + 1] token windows of the training split at random offsets (fixed seed)."""
    tokenizer = build_tiktoken_tokenizer(config)
    section = config.training
    _, source = resolve_source(section.dataset, section.dataset_path, "train", getattr(config, "data", None))
    stream: list[int] = []
    for doc in source():
        stream += tokenizer.encode(doc["text"], add_eos=True)
    tokens = torch.tensor(stream)
    if len(tokens) <= seq_len + 1:
        raise SystemExit(f"training.dataset {section.dataset!r}: {len(tokens)} tokens, fewer than one sequence")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (count,), generator=g)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def router_coefficient(config, scalars: dict, step: int) -> float:
    if config.moe.router == "relu":
        logged = scalars.get("remoe/l1_coeff", {})
        if step not in logged:
            raise SystemExit(f"step {step}: no remoe/l1_coeff logged at that step (metrics.log_freq must divide it)")
        return logged[step]
    return config.moe.aux_loss_coeff


def pull_at(model, objective, coeff: float, batches: list[torch.Tensor]) -> dict:
    """Per layer: gradient norms of the LM loss and of the router term on the router weight, their cosine,
    and routing numbers, summed over the batches (gradients accumulated as in one larger step)."""
    routers = [moe.router for moe in model.moe_layers()]
    captured: list = []
    hooks = [r.register_forward_hook(lambda m, i, out: captured.append(out)) for r in routers]
    g_lm = [torch.zeros_like(r.gate.weight) for r in routers]
    g_pen = [torch.zeros_like(r.gate.weight) for r in routers]
    zero, active, gate_sum, pairs = ([0.0] * len(routers) for _ in range(4))
    lm_loss: list[float] = []
    tokens = 0
    for batch in batches:
        captured.clear()
        logits = model(batch[:, :-1])
        records = model.pop_router_records()
        lm = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        penalty = coeff * objective.reduce_layers(torch.stack([r.loss_term for r in records]))
        weights = [r.gate.weight for r in routers]
        for acc, grads in ((g_lm, torch.autograd.grad(lm, weights, retain_graph=True)),
                           (g_pen, torch.autograd.grad(penalty, weights))):
            for a, g in zip(acc, grads):
                a += g / len(batches)
        lm_loss.append(lm.item())
        for layer, routing in enumerate(captured):
            count = routing.mask.sum(dim=1)
            zero[layer] += (count == 0).sum().item()
            active[layer] += count.sum().item()
            gate_sum[layer] += routing.gates[routing.mask].sum().item()
            pairs[layer] += int(routing.mask.sum())
        tokens += captured[0].mask.shape[0]
    for h in hooks:
        h.remove()
    return {
        "lm_loss": sum(lm_loss) / len(lm_loss),
        "ratio": [(p.norm() / l.norm()).item() for p, l in zip(g_pen, g_lm)],
        "cosine": [F.cosine_similarity(p.flatten(), l.flatten(), dim=0).item() for p, l in zip(g_pen, g_lm)],
        "no_expert": [z / tokens for z in zero],
        "active": [a / tokens for a in active],
        "gate": [s / max(n, 1) for s, n in zip(gate_sum, pairs)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (the trainer's job.dump_folder)")
    p.add_argument("--batches", type=int, default=2, help="training steps' worth of tokens per checkpoint")
    p.add_argument("--steps", type=int, nargs="*", help="checkpoint steps to read (default: all)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = lambda values, spec: " ".join(format(v, spec) for v in values)  # noqa: E731
    for run in a.runs:
        config = load_config(["--job.config_file", str(run / CONFIG_TOML)])
        if not get_router(config.moe.router).has_experts:
            print(f"{run}: moe.router = {config.moe.router!r} has no router to pull on; skipped")
            continue
        scalars = read_run(run)
        local, seq_len = config.training.local_batch_size, config.training.seq_len
        sequences = training_sequences(config, a.batches * local, seq_len).to(device)
        batches = list(sequences.split(local))
        print(f"\n{run} ({config.moe.router}, {a.batches} x {local} x {seq_len} training tokens per checkpoint)")
        print("| step | coeff | LM loss | |grad pen|/|grad LM| per layer | cosine | no expert | active | mean gate |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        steps = checkpoint_steps(run, config.checkpoint.folder)
        for step in a.steps or steps:
            if step not in steps:
                raise SystemExit(f"--steps {step}: no {run / config.checkpoint.folder / f'step-{step}'}")
            model = load_model(config, str(run / config.checkpoint.folder / f"step-{step}"), device)
            objective = get_router(config.moe.router).objective(model.args, device)
            coeff = router_coefficient(config, scalars, step)
            r = pull_at(model, objective, coeff, batches)
            print(f"| {step} | {coeff:.3g} | {r['lm_loss']:.3f} | {fmt(r['ratio'], '.2f')} | {fmt(r['cosine'], '+.2f')} | "
                  f"{fmt(r['no_expert'], '.0%')} | {fmt(r['active'], '.2f')} | {fmt(r['gate'], '.3f')} |")


if __name__ == "__main__":
    main()
