"""Routing alerts: a MoE layer that stopped routing is named in the log and in TensorBoard.

Two conditions, counted per layer in consecutive steps on the device (no host synchronisation of
their own: the counters travel in the step's one finiteness-check transfer):
- fully sparse: no (token, expert) pair is active in the layer. Its experts and its router then get no
  gradient from the LM loss, so only the L1 term moves the router (downwards): the layer cannot recover.
- dead experts: more than `dead_expert_share` of the layer's experts received less than
  DEAD_EXPERT_FRACTION of their fair share of the layer's pairs in the step.
When a condition has held for `alert_steps` steps the run logs one warning naming the layer (once per
episode), and `moe_layers/unhealthy/layer_i` reads 1 at logged steps while it holds.
"""

import torch

from remoe_recipe.metrics import DEAD_EXPERT_FRACTION
from remoe_recipe.routing_stats import ReducedRoutingStats


class RoutingHealth:
    def __init__(self, num_layers: int, num_experts: int, alert_steps: int, dead_share: float, device):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.alert_steps, self.dead_share = alert_steps, dead_share
        self.sparse_run = torch.zeros(num_layers, device=device)  # consecutive fully sparse steps
        self.dead_run = torch.zeros(num_layers, device=device)  # consecutive steps over the dead share
        self.dead = torch.zeros(num_layers, device=device)  # dead experts in the last step
        self.unhealthy = [False] * num_layers  # per layer, from the last host read
        self._warned = [set() for _ in range(num_layers)]

    def update(self, stats: ReducedRoutingStats) -> torch.Tensor:
        """Device-only; returns [sparse_run, dead_run, dead] (3L values) for the step's host transfer."""
        load = stats.tokens_per_expert
        fair = load.sum(dim=1, keepdim=True).clamp(min=1) / self.num_experts
        self.dead = (load / fair < DEAD_EXPERT_FRACTION).sum(dim=1).float()
        fully_sparse = load.sum(dim=1) == 0
        too_many_dead = self.dead > self.dead_share * self.num_experts
        self.sparse_run = torch.where(fully_sparse, self.sparse_run + 1, torch.zeros_like(self.sparse_run))
        self.dead_run = torch.where(too_many_dead, self.dead_run + 1, torch.zeros_like(self.dead_run))
        return torch.cat([self.sparse_run, self.dead_run, self.dead])

    def check(self, step: int, host: list[float]) -> list[str]:
        """From the host copy of update()'s values: the warnings to log now (each once per episode)."""
        L, N = self.num_layers, self.num_experts
        sparse_run, dead_run, dead = host[:L], host[L : 2 * L], host[2 * L : 3 * L]
        warnings = []
        for layer in range(L):
            sparse = sparse_run[layer] >= self.alert_steps
            # A fully sparse layer has every expert dead too: one warning (the more specific) is enough.
            alerts = {"sparse": sparse, "dead": dead_run[layer] >= self.alert_steps and not sparse}
            self.unhealthy[layer] = any(alerts.values())
            for kind, on in alerts.items():
                if not on:
                    self._warned[layer].discard(kind)  # the episode ended; warn again next time
                elif kind not in self._warned[layer]:
                    self._warned[layer].add(kind)
                    warnings.append(self._message(step, layer, kind, int(dead[layer]), N))
        return warnings

    def scalars(self) -> dict[str, float]:
        values = {f"moe_layers/unhealthy/layer_{i}": float(u) for i, u in enumerate(self.unhealthy)}
        values["moe/unhealthy_layers"] = float(sum(self.unhealthy))
        return values

    def _message(self, step: int, layer: int, kind: str, dead: int, n: int) -> str:
        if kind == "sparse":
            return (
                f"step {step}: MoE layer {layer} has been 100 % sparse for {self.alert_steps} steps: no token "
                f"reaches any of its experts, so its router gets no gradient to recover (a smaller "
                f"moe.l1_coeff_init, or a restart from an earlier checkpoint, helps)"
            )
        return (
            f"step {step}: MoE layer {layer} has had more than {self.dead_share:.0%} of its experts dead for "
            f"{self.alert_steps} steps ({dead} of {n} now below {DEAD_EXPERT_FRACTION:.0%} of their fair share)"
        )
