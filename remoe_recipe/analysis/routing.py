"""Routing analysis of a trained checkpoint, like the paper's §5: figures and a markdown report.

    python -m remoe_recipe.analysis.routing --config train_configs/debug_remoe.toml \\
        --checkpoint outputs/debug_remoe/checkpoint/step-300 --out outputs/debug_remoe/routing

Runs the model (one process, CPU or one GPU) over documents of the config's validation set (or
`--split train`), records every layer's routing mask, and writes:
- dynamic_allocation.png: active experts per token against the token's frequency (rare tokens get more);
- domain_specialization.png: per layer, the share of each domain's tokens that activates each expert;
- active_experts_by_layer.png: mean active experts per token by layer, one line per domain;
- report.md: the numbers behind the figures, per layer the share of tokens with 0, 1, 2, ... active
  experts (a ReLU router can give a token no expert: that layer's MoE adds nothing to it), and the tokens
  most routed to each expert.
Domains are the documents' `source` labels (the built-in corpus: the play; the Pile: pile_set_name).
"""

import argparse
import math
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from remoe_recipe.data import build_tiktoken_tokenizer, resolve_source
from remoe_recipe.data.shards import is_shard_dir
from remoe_recipe.model import ReMoETransformer
from remoe_recipe.model.args import remoe_flavors
from remoe_recipe.preflight import load_config
from remoe_recipe.run_log import CONFIG_TOML


class RoutingRecorder:
    """Forward hooks on every router: per layer, the boolean [tokens, experts] routing masks."""

    def __init__(self, model: ReMoETransformer):
        self.masks: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
        for layer, moe in enumerate(model.moe_layers()):
            moe.router.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def record(module, inputs, routing):
            self.masks[layer].append(routing.mask.cpu())
        return record

    def stacked(self) -> torch.Tensor:
        """[layers, tokens, experts] for everything recorded."""
        return torch.stack([torch.cat(m) for m in self.masks])


def load_model(config, checkpoint: str | None, device: torch.device) -> ReMoETransformer:
    args = remoe_flavors()[config.model.flavor]
    args.update_from_config(config)
    with torch.device("meta"):
        model = ReMoETransformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if checkpoint:
        path = Path(checkpoint)
        if not (path / ".metadata").exists():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: not a checkpoint folder (no .metadata)")
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(path))  # reads only the model's keys
        model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def collect(model, tokenizer, documents, seq_len: int, max_tokens: int, device):
    """Run documents through the model in seq_len chunks. Returns token ids [T], domains [T] and
    masks [L, T, N] for the first max_tokens tokens."""
    recorder = RoutingRecorder(model)
    token_ids, domains = [], []
    for doc in documents:
        ids = tokenizer.encode(doc["text"], add_eos=True)
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len]
            model(torch.tensor([chunk], device=device))
            model.pop_router_records()
            token_ids += chunk
            domains += [str(doc.get("source", "all"))] * len(chunk)
            if len(token_ids) >= max_tokens:
                return token_ids, domains, recorder.stacked()
    return token_ids, domains, recorder.stacked()


def analyse(token_ids, domains, masks, tokenizer, top_n: int = 8, min_count: int = 5) -> dict:
    L, T, N = masks.shape
    active = masks.sum(dim=2).float()  # [L, T]
    # count_share[l, c]: share of layer l's tokens that activate exactly c experts (c = 0 .. N)
    count_share = torch.stack(
        [torch.bincount(masks[layer].sum(dim=1), minlength=N + 1).float() / T for layer in range(L)]
    )
    freq = Counter(token_ids)
    per_token_active = defaultdict(list)
    mean_active = active.mean(dim=0).tolist()
    for t, tok in enumerate(token_ids):
        per_token_active[tok].append(mean_active[t])
    domain_names = sorted(set(domains))
    domain_index = torch.tensor([domain_names.index(d) for d in domains])
    # share[l, d, e]: fraction of domain d's tokens in layer l that activate expert e
    share = torch.zeros(L, len(domain_names), N)
    active_by_domain = torch.zeros(L, len(domain_names))
    for d in range(len(domain_names)):
        sel = domain_index == d
        share[:, d, :] = masks[:, sel, :].float().mean(dim=1)
        active_by_domain[:, d] = active[:, sel].mean(dim=1)
    top_tokens = []
    ids = torch.tensor(token_ids)
    for layer in range(L):
        per_expert = []
        for e in range(N):
            routed = Counter(ids[masks[layer, :, e]].tolist())
            ranked = sorted(
                ((routed[tok] / freq[tok], freq[tok], tok) for tok in routed if freq[tok] >= min_count),
                reverse=True,
            )[:top_n]
            per_expert.append([(tokenizer.decode([tok]), rate, count) for rate, count, tok in ranked])
        top_tokens.append(per_expert)
    return {
        "layers": L, "tokens": T, "experts": N, "domains": domain_names,
        "frequency": {tok: freq[tok] for tok in per_token_active},
        "token_active": {tok: sum(v) / len(v) for tok, v in per_token_active.items()},
        "token_text": {tok: tokenizer.decode([tok]) for tok in per_token_active},
        "share": share, "active_by_domain": active_by_domain, "top_tokens": top_tokens,
        "layer_active": active.mean(dim=1).tolist(),
        "count_share": count_share,
    }


def _pick_layers(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 2, num_layers - 1})


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # Dynamic allocation: tokens binned by frequency (log scale), mean active experts per bin.
    freq, act = result["frequency"], result["token_active"]
    toks = sorted(freq, key=lambda t: freq[t])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([freq[t] for t in toks], [act[t] for t in toks], s=6, alpha=0.4, label="token")
    edges = sorted({int(10 ** (i / 4)) for i in range(0, 4 * int(math.log10(max(freq.values())) + 1) + 1)})
    centers, means = [], []
    for lo, hi in zip(edges, edges[1:]):
        in_bin = [act[t] for t in toks if lo <= freq[t] < hi]
        if in_bin:
            centers.append(math.sqrt(lo * hi))
            means.append(sum(in_bin) / len(in_bin))
    ax.plot(centers, means, color="black", label="mean per frequency bin")
    ax.set_xscale("log")
    ax.set_xlabel("token frequency in the analysed text")
    ax.set_ylabel("active experts per token (mean over layers)")
    ax.set_title("Dynamic allocation: experts per token vs frequency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dynamic_allocation.png", dpi=120)
    plt.close(fig)
    written.append("dynamic_allocation.png")

    layers = _pick_layers(result["layers"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 0.45 * len(result["domains"]) + 2))
    axes = [axes] if len(layers) == 1 else list(axes)
    for ax, layer in zip(axes, layers):
        im = ax.imshow(result["share"][layer].numpy(), cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(result["domains"])), result["domains"], fontsize=7)
        ax.set_xticks(range(result["experts"]))
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the domain's tokens")
    fig.suptitle("Domain specialization: share of each domain's tokens routed to each expert")
    fig.tight_layout()
    fig.savefig(out / "domain_specialization.png", dpi=120)
    plt.close(fig)
    written.append("domain_specialization.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for d, name in enumerate(result["domains"]):
        ax.plot(range(result["layers"]), result["active_by_domain"][:, d].tolist(), marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("active experts per token")
    ax.set_title("Active experts by layer and domain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "active_experts_by_layer.png", dpi=120)
    plt.close(fig)
    written.append("active_experts_by_layer.png")
    return written


def write_report(result: dict, figures: list[str], out: Path, checkpoint: str | None) -> None:
    lines = [
        "# Routing analysis",
        "",
        f"Checkpoint: `{checkpoint or 'freshly initialised model'}`; {result['tokens']:,} tokens, "
        f"{result['layers']} MoE layers, {result['experts']} experts per layer.",
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
        "## Active experts per token by layer",
        "",
        "| layer | " + " | ".join(result["domains"]) + " | all |",
        "|---|" + "---|" * (len(result["domains"]) + 1),
    ]
    for layer in range(result["layers"]):
        row = [f"{v:.2f}" for v in result["active_by_domain"][layer].tolist()]
        lines.append(f"| {layer} | " + " | ".join(row) + f" | {result['layer_active'][layer]:.2f} |")
    shown = 4  # columns 0, 1, 2, 3 and ">= 4" active experts
    lines += ["", "## Tokens by number of active experts", "",
              "Share of each layer's tokens that activate exactly c experts (0: the layer's MoE adds nothing).", "",
              "| layer | " + " | ".join(str(c) for c in range(shown)) + f" | >= {shown} |", "|---|" + "---|" * (shown + 1)]
    for layer in range(result["layers"]):
        share = result["count_share"][layer]
        cells = [f"{v:.1%}" for v in share[:shown].tolist()] + [f"{share[shown:].sum().item():.1%}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    freq, act = result["frequency"], result["token_active"]
    common = sorted(freq, key=lambda t: -freq[t])[:10]
    lines += ["", "## Dynamic allocation", "", "Most frequent tokens and their mean active experts:", ""]
    lines += ["| token | count | active experts |", "|---|---|---|"]
    lines += [f"| `{_escape(result['token_text'][t])}` | {freq[t]} | {act[t]:.2f} |" for t in common]
    for layer in _pick_layers(result["layers"]):
        lines += ["", f"## Tokens most routed to each expert, layer {layer}", "",
                  "Rate = fraction of the token's occurrences that activate the expert (tokens seen >= 5 times).", "",
                  "| expert | tokens (rate) |", "|---|---|"]
        for e, toks in enumerate(result["top_tokens"][layer]):
            cells = ", ".join(f"`{_escape(text)}` ({rate:.0%})" for text, rate, _ in toks)
            lines.append(f"| {e} | {cells or '—'} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n").replace("`", "'")


def saved_run_config(checkpoint: str | None) -> str:
    """<run>/config.toml for a checkpoint <run>/<checkpoint.folder>/step-N (written by remoe_recipe.train)."""
    if not checkpoint:
        raise SystemExit("--config is needed without --checkpoint")
    path = Path(checkpoint).resolve().parent.parent / CONFIG_TOML
    if not path.is_file():
        raise SystemExit(
            f"--checkpoint {checkpoint}: no {path} (the trainer saves the run's resolved config there); "
            "pass the run's TOML with --config and its command-line overrides after --"
        )
    return str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", help="the run's TOML (model, [moe], tokenizer, datasets); default: the config.toml the trainer "
        "saved in the checkpoint's run folder, which includes the run's command-line overrides",
    )
    p.add_argument("--checkpoint", help="a checkpoint step folder, e.g. outputs/run/checkpoint/step-300")
    p.add_argument("--out", required=True, help="folder for the figures and report.md")
    p.add_argument("--split", choices=("validation", "train"), default="validation")
    p.add_argument("--max-tokens", type=int, default=50_000)
    p.add_argument("overrides", nargs="*", help="extra --section.key value overrides, after --")
    a = p.parse_args(argv)
    if a.config is None:
        a.config = saved_run_config(a.checkpoint)
    config = load_config(["--job.config_file", a.config, *a.overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tiktoken_tokenizer(config)
    model = load_model(config, a.checkpoint, device)
    if not model.moe_layers():
        raise SystemExit(f"{a.config}: moe.router = {config.moe.router!r} has no experts, so no routing to analyse")
    key = "validation" if a.split == "validation" else "training"
    section = getattr(config, key)
    if section.dataset_path and is_shard_dir(Path(section.dataset_path)):
        raise SystemExit(
            f"{key}.dataset_path = {section.dataset_path}: token shards hold no text; give the "
            f"analysis a text source with -- --{key}.dataset_path PATH"
        )
    _, source = resolve_source(section.dataset, section.dataset_path, a.split, getattr(config, "data", None))
    token_ids, domains, masks = collect(
        model, tokenizer, source(), config.training.seq_len, a.max_tokens, device
    )
    result = analyse(token_ids, domains, masks, tokenizer)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot(result, out)
    write_report(result, figures, out, a.checkpoint)
    print(f"wrote {', '.join(figures)} and report.md to {out}")


if __name__ == "__main__":
    main()
