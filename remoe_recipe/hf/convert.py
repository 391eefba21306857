"""State-dict conversion between the recipe's model and its Hugging Face layout, in both directions.

One mapping backs the exporter (`python -m remoe_recipe.export`) and torchtitan's own HF path (the train
spec's `ReMoEStateDictAdapter`: `--checkpoint.last_save_in_hf` / `--checkpoint.initial_load_in_hf`).

HF names follow Llama / Qwen2-MoE (`model.layers.{i}.self_attn.q_proj.weight`, ...). The MoE layer is
`mlp.gate.weight` (router, [N, D]) and per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`: the recipe
stacks experts ([N, H, D] / [N, D, H]), HF checkpoints keep one 2-D tensor per expert, which every
transformers version reads.

RoPE: the recipe (torchtitan's complex RoPE) rotates interleaved pairs of a head's dims (2j, 2j+1); HF's
`rotate_half` rotates (j, j + head_dim/2). The q/k projection rows are permuted per head on export (and back
on import), as torchtitan's llama3 adapter and transformers' Llama conversion script do.
"""

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torchtitan.models.utils import MoEStateDictAdapter

from remoe_recipe.model.args import ReMoEModelArgs

# recipe name template -> HF name template ({} = layer index); experts are handled apart.
_PLAIN = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.moe.router.gate.weight": "model.layers.{}.mlp.gate.weight",
}
_EXPERTS = {  # stacked recipe tensor -> per-expert HF template ({} = layer, expert)
    "layers.{}.moe.experts.w1": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.moe.experts.w3": "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.moe.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}
_PLAIN_FROM_HF = {v: k for k, v in _PLAIN.items()}
_EXPERTS_FROM_HF = {v: k for k, v in _EXPERTS.items()}
_LAYER = re.compile(r"\d+")


def _template(key: str, count: int) -> tuple[str, list[str]]:
    return _LAYER.sub("{}", key, count=count), _LAYER.findall(key)[:count]


def rope_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of one head: interleaved pairs (2j, 2j+1) -> halves (j, j + head_dim/2)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def rope_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def _heads(template: str, args: ReMoEModelArgs) -> int | None:
    if template.endswith("attention.wq.weight") or template.endswith("self_attn.q_proj.weight"):
        return args.n_heads
    if template.endswith("attention.wk.weight") or template.endswith("self_attn.k_proj.weight"):
        return args.n_kv_heads
    return None


def iter_to_hf(state_dict: dict[str, torch.Tensor], args: ReMoEModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every recipe tensor, one at a time: experts are views of the stacked
    weight, so the exporter never holds a second copy of the model. Unknown names raise."""
    for key, value in state_dict.items():
        template, layer = _template(key, 1)
        if template in _EXPERTS:
            for e in range(value.shape[0]):
                yield _EXPERTS[template].format(*layer, e), value[e]
        elif template in _PLAIN:
            heads = _heads(template, args)
            yield _PLAIN[template].format(*layer), value if heads is None else rope_to_hf(value, heads)
        else:
            raise KeyError(f"{key}: no Hugging Face name for this recipe tensor")


def to_hf(state_dict: dict[str, torch.Tensor], args: ReMoEModelArgs) -> dict[str, torch.Tensor]:
    return dict(iter_to_hf(state_dict, args))


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: ReMoEModelArgs) -> dict[str, torch.Tensor]:
    """The recipe's state dict from HF tensors (experts stacked back). Unknown names raise; a layer
    with missing experts raises."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in hf_state_dict.items():
        template, numbers = _template(key, 2)
        if template in _EXPERTS_FROM_HF:
            layer, expert = numbers
            experts.setdefault(_EXPERTS_FROM_HF[template].format(layer), {})[int(expert)] = value
            continue
        template, numbers = _template(key, 1)
        if template not in _PLAIN_FROM_HF:
            raise KeyError(f"{key}: not a tensor of the recipe's model")
        recipe_template = _PLAIN_FROM_HF[template]
        heads = _heads(recipe_template, args)
        out[recipe_template.format(*numbers)] = value if heads is None else rope_from_hf(value, heads)
    for key, by_index in experts.items():
        if sorted(by_index) != list(range(args.num_routed_experts)):
            raise KeyError(f"{key}: experts {sorted(by_index)} found, expected 0..{args.num_routed_experts - 1}")
        out[key] = torch.stack([by_index[e] for e in range(args.num_routed_experts)])
    return out


class ReMoEStateDictAdapter(MoEStateDictAdapter):
    """torchtitan's hook (TrainSpec.state_dict_adapter) over the same mapping. Sharded (FSDP / EP)
    stacked experts are split locally with torchtitan's MoE helpers, without an all-gather."""

    def __init__(self, model_args: ReMoEModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf: dict[str, Any] = {}
        plain = {}
        for key, value in state_dict.items():
            template, layer = _template(key, 1)
            if template in _EXPERTS and isinstance(value, DTensor):
                # Placement metadata for from_hf, as torchtitan's MoE adapters record it.
                self.grouped_expert_weight_placements[template] = value.placements
                self.grouped_expert_weight_shape[template] = value.shape
                self.grouped_expert_weight_mesh[template] = value.device_mesh
                hf.update(self._get_local_experts_weights(_EXPERTS[template], template, layer[0], value))
            else:
                plain[key] = value
        hf.update(to_hf(plain, self.model_args))
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        plain, sharded = {}, {}
        for key, value in hf_state_dict.items():
            template, numbers = _template(key, 2)
            recipe = _EXPERTS_FROM_HF.get(template)
            if recipe is not None and recipe in self.local_experts_indices:
                sharded.setdefault(numbers[0], {}).setdefault(recipe, {})[int(numbers[1])] = value
            else:
                plain[key] = value
        out = {}
        if plain:
            out.update(from_hf(plain, self.model_args))
        for layer, by_key in list(sharded.items()):
            for recipe in list(by_key):
                out[recipe.format(layer)] = self._concatenate_expert_weights_dtensor(sharded, recipe, layer)
        return out
