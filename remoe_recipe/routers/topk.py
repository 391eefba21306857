"""The paper's TopK baseline (dMoE, Eq. 2): softmax over all N experts, then TopK, not renormalised (the
official --moe-router-pre-softmax), so k = 1 still gives the router a gradient; trained with the
Switch-style load-balancing loss in its general-k form (Megatron's switch_load_balancing_loss_func),
summed over layers as Megatron does, times moe.aux_loss_coeff."""

import torch
import torch.nn.functional as F
from torch import nn

from remoe_recipe.routers.objective import RouterObjective
from remoe_recipe.routers.registry import PaperRow, RouterSpec, register_router
from remoe_recipe.routers.routing import Router, Routing, load_balance_weights


class TopKRouter(Router):
    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__(num_experts, top_k)
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_probs, top_idx = torch.topk(probs, k=self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, top_idx, top_probs)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_idx, True)
        num_tokens = max(x.shape[0], 1)
        f = load_balance_weights(mask, self.top_k)
        loss_term = (probs.sum(dim=0) * f).sum() / num_tokens
        return Routing(gates=gates, mask=mask, loss_term=loss_term)


class AuxLossObjective(RouterObjective):
    def loss_coeff(self) -> float:
        return self.args.moe.aux_loss_coeff

    def log_tensors(self, stats) -> dict[str, torch.Tensor]:
        # Mean over layers: 1 when balanced, whatever the depth.
        return {"moe/aux_loss": stats.loss_term}


def _check(moe) -> list[str]:
    if moe.aux_loss_coeff < 0:
        return [f"moe.aux_loss_coeff = {moe.aux_loss_coeff}: expected >= 0"]
    return []


SPEC = register_router(RouterSpec(
    name="topk",
    summary="the paper's baseline (dMoE): softmax, then TopK, Switch load-balancing loss (paper Eq. 2)",
    build=lambda args, layer_id: TopKRouter(args.dim, args.num_routed_experts, args.routed_top_k),
    objective=AuxLossObjective,
    config_keys=("aux_loss_coeff", "router_init_std"),
    check=_check,
    paper_table2=PaperRow("dMoE (paper)", (20.05, 45.16, 57.83, 29.83, 32.97, 63.55, 28.33), 39.67),
    hf_remote_code=True,
))
