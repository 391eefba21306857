"""See what a trained model writes.

    python -m remoe_recipe.generate --checkpoint outputs/debug_remoe/checkpoint --prompt "ROMEO." [--max-new-tokens 64]
    ... --top-p 0.9 --temperature 0.8 --seed 1      # nucleus sampling, repeatable with the seed
    ... --show-experts                              # ReLU router: experts each token used (mean over layers)

Greedy by default. The model has no KV cache: each step re-reads the last `training.seq_len` tokens.
With --show-experts, every token of prompt and continuation is printed with the number of experts it
activated, averaged over layers: ReMoE's dynamic allocation (paper §5), visible on any text.
"""

import argparse
import sys
from collections.abc import Iterator

import torch

from remoe_recipe.load_checkpoint import CheckpointError, load_trained_model


def _next_token(logits: torch.Tensor, top_p: float | None, temperature: float,
                generator: torch.Generator | None) -> int:
    if top_p is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial((sorted_probs / sorted_probs.sum()).float().cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


@torch.no_grad()
def generate_tokens(model, prompt: list[int], max_new_tokens: int, max_len: int, eos_id: int | None = None,
                    device: torch.device | str = "cpu", top_p: float | None = None, temperature: float = 1.0,
                    seed: int | None = None, vocab_size: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens tokens (stops after EOS). Padded vocabulary rows past the
    tokenizer's `vocab_size` are never chosen."""
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        window = torch.tensor([tokens[-max_len:]], dtype=torch.long, device=device)
        logits = model(window)[0, -1].float()
        if vocab_size is not None:
            logits[vocab_size:] = float("-inf")
        token = _next_token(logits, top_p, temperature, generator)
        tokens.append(token)
        yield token
        if token == eos_id:
            return


@torch.no_grad()
def experts_per_token(model, tokens: list[int], device) -> torch.Tensor:
    """[len(tokens)] mean over layers of the experts each token activated (the recipe's routers)."""
    masks = []
    hooks = [moe.router.register_forward_hook(lambda m, i, routing: masks.append(routing.mask))
             for moe in model.moe_layers()]
    try:
        model(torch.tensor([tokens], dtype=torch.long, device=device))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([m.sum(-1).float().cpu() for m in masks]).mean(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint (latest step, or --step) or a step folder")
    p.add_argument("--step", type=int)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-p", type=float, help="nucleus sampling with this mass (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--show-experts", action="store_true", help="print experts used per token (MoE routers)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", help="the run's TOML, for runs without RUN/job_config.json (overrides after --)")
    p.add_argument("--tokenizer", help="the run's tokenizer, if not where the run had it")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.top_p is not None and not 0 < a.top_p <= 1:
        p.error(f"--top-p {a.top_p}: expected a probability mass in (0, 1]")
    if a.temperature <= 0:
        p.error(f"--temperature {a.temperature}: expected > 0")
    try:
        trained = load_trained_model(a.checkpoint, a.step, a.config, a.overrides, a.tokenizer, device=a.device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tok, max_len = trained.tokenizer, trained.args.max_seq_len
    prompt = tok.encode(a.prompt)
    if not prompt:
        p.error("--prompt is empty")
    new = list(generate_tokens(
        trained.model, prompt, a.max_new_tokens, max_len, tok.eos_id, a.device, a.top_p, a.temperature,
        a.seed, tok.get_vocab_size(),
    ))
    print(a.prompt + tok.decode(new))
    if a.show_experts:
        if not trained.args.is_moe:
            print("(dense model: no experts to show)")
            return
        tokens = (prompt + new)[-max_len:]
        counts = experts_per_token(trained.model, tokens, a.device)
        n = trained.args.num_routed_experts
        print(f"\nexperts per token (mean over {trained.args.n_layers} layers, of {n}; "
              f"router {trained.args.moe.router}):")
        print(" ".join(f"{tok.decode([t])!r}:{c:.3g}" for t, c in zip(tokens, counts.tolist())))
        generated = counts[len(tokens) - len(new):]
        if len(generated):
            print(f"generated tokens: {generated.mean():.2f} experts per token per layer "
                  f"(min {generated.min():.2g}, max {generated.max():.2g})")


if __name__ == "__main__":
    main()
