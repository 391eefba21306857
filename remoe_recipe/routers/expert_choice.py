"""Expert-choice routing, the paper's Table 2 baseline "EC" (Zhou et al. 2022, "Mixture-of-Experts with
Expert Choice Routing"): scores = softmax(x W) over the N experts; each expert takes the C tokens of the
micro-batch with its highest scores, C = ceil(T · k / N) (capacity factor 1: k experts per token on
average, the same compute as TopK); a chosen pair's gate is its score. Balanced by construction, so no
auxiliary loss. A token may get 0..N experts. The choice depends on the other tokens routed with it,
later positions of its own sequence included: expert choice is not causal (as in the original), and
its outputs change with how tokens are batched (evaluation and generation route each forward's tokens
together)."""

import torch
import torch.nn.functional as F
from torch import nn

from remoe_recipe.routers.registry import PaperRow, RouterSpec, register_router
from remoe_recipe.routers.routing import Router, Routing


class ExpertChoiceRouter(Router):
    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__(num_experts, top_k)
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, -(-num_tokens * self.top_k // self.num_experts))

    def num_pairs(self, num_tokens: int) -> int:
        return self.num_experts * self.capacity(num_tokens)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        scores = F.softmax(self.gate(x).float(), dim=-1)  # [T, N]
        top_scores, top_tokens = torch.topk(scores.t(), k=self.capacity(x.shape[0]), dim=1)  # [N, C]
        gates = torch.zeros_like(scores.t()).scatter(1, top_tokens, top_scores).t()
        mask = torch.zeros_like(scores.t(), dtype=torch.bool).scatter(1, top_tokens, True).t()
        return Routing(gates=gates, mask=mask, loss_term=scores.new_zeros(()))


SPEC = register_router(RouterSpec(
    name="expert_choice",
    summary="baseline: each expert takes its top T·k/E tokens by softmax score (Table 2's EC; not causal)",
    build=lambda args, layer_id: ExpertChoiceRouter(args.dim, args.num_routed_experts, args.routed_top_k),
    config_keys=("router_init_std",),
    paper_table2=PaperRow("EC (paper)", (18.86, 42.97, 60.21, 29.14, 29.26, 61.92, 27.37), 38.53),
))
