"""Adds the router's auxiliary loss to torchtitan's language-model loss.

torchtitan's loss function returns a SUM over tokens, which the trainer divides by the global number of
valid tokens. A router term is a per-token mean over a micro-batch of T tokens, so it enters as
T * coeff * term: after the division the step's loss is the token-weighted mean, and its gradient does
not depend on how the global batch is split into ranks and micro-batches.

The router's objective (remoe_recipe/routers) says the coefficient and how the layers' terms combine:
ReMoE's adaptive λ times the mean over layers of Eq. 10 (or 9); TopK's aux_loss_coeff times the sum over
layers of the Switch loss, as Megatron does; no loss at all for hash and expert-choice routing.

The returned value stays the pure language-model loss (`aux - aux.detach()` adds only the gradient),
so torchtitan's logged loss is comparable across routers; the router terms are logged separately.
"""

from collections.abc import Callable

import torch
from torchtitan.components.loss import IGNORE_INDEX

from remoe_recipe.routers import RouterObjective
from remoe_recipe.routing_stats import StepRoutingStats


class RouterLossWrapper:
    def __init__(
        self,
        lm_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        model_parts: list[torch.nn.Module],
        objective: RouterObjective,
        stats: StepRoutingStats,
    ):
        self.lm_loss_fn = lm_loss_fn
        self.model_parts = model_parts
        self.objective = objective
        self.stats = stats

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self.lm_loss_fn(pred, labels)
        records = [r for part in self.model_parts for r in part.pop_router_records()]
        if not records:
            return loss_sum
        self.stats.add(records, loss_sum, (labels != IGNORE_INDEX).sum())
        coeff = self.objective.loss_coeff()
        if coeff is None:
            return loss_sum
        term = self.objective.reduce_layers(torch.stack([r.loss_term for r in records]))
        aux = coeff * records[0].num_tokens * term
        return loss_sum + (aux - aux.detach()).to(loss_sum.dtype)
