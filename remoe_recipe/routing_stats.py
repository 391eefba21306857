"""Per-step routing statistics: accumulated on device over layers and micro-batches, reduced once.

Sparsity is the paper's Eq. 8: the fraction of zero gates over all MoE layers, all micro-batches of
the step and every rank that holds distinct tokens. Everything is kept as device tensors and all-reduced
in one collective, so collecting it costs no host synchronisation.
"""

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from remoe_recipe import named_tensors
from remoe_recipe.model.moe import RouterRecord


@dataclass
class RoutingSums:
    """The step's sums, per MoE layer where they have an [L] dimension; summed over ranks by `reduce`."""

    active_pairs: torch.Tensor  # [L] (token, expert) pairs that ran
    gate_slots: torch.Tensor  # [L] tokens x experts: the pairs that could have run
    loss_terms: torch.Tensor  # [L] the router's loss term, summed over the step's forwards
    tokens_per_expert: torch.Tensor  # [L, N] pairs per expert
    lm_loss_sum: torch.Tensor  # 0-d the language-model loss summed over tokens
    lm_tokens: torch.Tensor  # 0-d the tokens it was summed over
    forwards: torch.Tensor  # 0-d micro-batch forwards

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, device) -> "RoutingSums":
        L, N = num_layers, num_experts
        return cls(
            active_pairs=torch.zeros(L, device=device), gate_slots=torch.zeros(L, device=device),
            loss_terms=torch.zeros(L, device=device), tokens_per_expert=torch.zeros(L, N, device=device),
            lm_loss_sum=torch.zeros((), device=device), lm_tokens=torch.zeros((), device=device),
            forwards=torch.zeros((), device=device),
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ReducedRoutingStats:
    sparsity: torch.Tensor  # 0-d: 1 - active pairs / (layers * tokens * experts), all ranks
    layer_sparsity: torch.Tensor  # [L]
    loss_term: torch.Tensor  # 0-d: mean over layers, micro-batches and ranks of the router loss term
    layer_loss_term: torch.Tensor  # [L]
    tokens_per_expert: torch.Tensor  # [L, N]: active pairs per expert, summed over the step
    lm_loss: torch.Tensor  # 0-d: the step's language-model loss per valid token, all ranks
    num_experts: int

    @property
    def active_experts_per_token(self) -> torch.Tensor:
        return (1.0 - self.sparsity) * self.num_experts


class StepRoutingStats:
    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        self.num_layers, self.num_experts, self.device = num_layers, num_experts, device
        self.reset()

    def reset(self) -> None:
        self.sums = RoutingSums.zeros(self.num_layers, self.num_experts, self.device)

    def add(self, records: list[RouterRecord], lm_loss_sum: torch.Tensor, lm_tokens: torch.Tensor) -> None:
        """One micro-batch: its records (one per MoE layer, in layer order) and its LM loss sum."""
        if len(records) != self.num_layers:
            raise RuntimeError(
                f"expected one router record per MoE layer ({self.num_layers}), got {len(records)}"
            )
        s = self.sums
        counts = torch.stack([r.tokens_per_expert for r in records])
        s.tokens_per_expert += counts
        s.active_pairs += counts.sum(dim=1)
        # Token counts are host ints: add them as scalars (a kernel argument), never as a tensor built
        # from a Python list (a host-to-device copy per micro-batch).
        sizes = {r.num_tokens for r in records}
        if len(sizes) == 1:
            s.gate_slots += float(sizes.pop() * self.num_experts)
        else:
            for i, r in enumerate(records):
                s.gate_slots[i] += float(r.num_tokens * self.num_experts)
        s.loss_terms += torch.stack([r.loss_term.detach().float() for r in records])
        s.forwards += 1
        s.lm_loss_sum += lm_loss_sum.detach().float()
        s.lm_tokens += lm_tokens.float()

    def reduce(self, group: dist.ProcessGroup | None) -> ReducedRoutingStats:
        """Sum over the ranks of `group` (None: this process only) in one all-reduce."""
        s = RoutingSums(**named_tensors.all_reduce(self.sums.as_dict(), group))
        layer_loss_term = s.loss_terms / s.forwards.clamp(min=1)
        # `gates > 0` is False for a NaN gate, so a NaN router would read as 100 % sparse. The loss term
        # sums the layer's gates (or router probabilities), so it is NaN exactly then: report NaN.
        finite = torch.isfinite(layer_loss_term)
        nan = torch.full_like(layer_loss_term, float("nan"))
        layer_sparsity = torch.where(finite, 1.0 - s.active_pairs / s.gate_slots.clamp(min=1), nan)
        sparsity = torch.where(
            finite.all(), 1.0 - s.active_pairs.sum() / s.gate_slots.sum().clamp(min=1), nan[0]
        )
        return ReducedRoutingStats(
            sparsity=sparsity,
            layer_sparsity=layer_sparsity,
            loss_term=layer_loss_term.mean(),
            layer_loss_term=layer_loss_term,
            tokens_per_expert=s.tokens_per_expert,
            lm_loss=s.lm_loss_sum / s.lm_tokens.clamp(min=1),
            num_experts=self.num_experts,
        )
