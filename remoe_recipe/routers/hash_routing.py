"""Hash routing, the paper's Table 2 baseline "Hash" (Roller et al. 2021, "Hash Layers For Large Sparse
Models"; the ReMoE paper's baseline hashes with `mod E`): a fixed map from the token id to its experts,
no router parameters, no auxiliary loss. Token t uses expert t mod N at k = 1; with k·G experts per token
(granularity G) it uses the k·G consecutive experts from (t · k·G) mod N, so at granularity G a token
gets all G slices of coarse expert t mod E, the same function as coarse hashing. Each chosen expert's
output is added with gate 1 (Hash Layers weight nothing)."""

import torch

from remoe_recipe.routers.registry import PaperRow, RouterSpec, register_router
from remoe_recipe.routers.routing import Router, Routing


class HashRouter(Router):
    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("hash routing needs the token ids of the routed tokens")
        ids = token_ids.reshape(-1).to(torch.int64)
        offsets = torch.arange(self.top_k, device=ids.device)
        experts = (ids.unsqueeze(1) * self.top_k + offsets) % self.num_experts  # [T, k]
        mask = torch.zeros(ids.shape[0], self.num_experts, dtype=torch.bool, device=ids.device)
        mask.scatter_(1, experts, True)
        gates = mask.float()
        return Routing(gates=gates, mask=mask, loss_term=gates.new_zeros(()))


SPEC = register_router(RouterSpec(
    name="hash",
    summary="baseline: a fixed token-id hash (id mod E) picks the experts, gate 1, no router weights (Table 2's Hash)",
    build=lambda args, layer_id: HashRouter(args.num_routed_experts, args.routed_top_k),
    paper_table2=PaperRow("Hash (paper)", (19.28, 45.45, 54.95, 29.68, 31.44, 63.06, 27.66), 38.79),
))
