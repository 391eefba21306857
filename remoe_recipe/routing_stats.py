"""Per-step routing statistics: accumulated on device over layers and micro-batches, reduced once.

Sparsity is the paper's Eq. 8: the fraction of zero gates over all MoE layers, all micro-batches of
the step and every rank that holds distinct tokens. Everything is kept as device tensors and all-reduced
in one collective, so collecting it costs no host synchronisation.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from remoe_recipe.model.moe import RouterRecord


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
        L, N = self.num_layers, self.num_experts
        self.active = torch.zeros(L, device=self.device)
        self.slots = torch.zeros(L, device=self.device)
        self.loss_terms = torch.zeros(L, device=self.device)
        self.tokens_per_expert = torch.zeros(L, N, device=self.device)
        self.forwards = torch.zeros(1, device=self.device)
        self.lm_loss = torch.zeros(2, device=self.device)  # [loss sum, valid tokens]

    def add(self, records: list[RouterRecord], lm_loss_sum: torch.Tensor, lm_tokens: torch.Tensor) -> None:
        """One micro-batch: its records (one per MoE layer, in layer order) and its LM loss sum."""
        if len(records) != self.num_layers:
            raise RuntimeError(
                f"expected one router record per MoE layer ({self.num_layers}), got {len(records)}"
            )
        counts = torch.stack([r.tokens_per_expert for r in records])
        self.tokens_per_expert += counts
        self.active += counts.sum(dim=1)
        # Token counts are host ints: add them as scalars (a kernel argument), never as a tensor built
        # from a Python list (a host-to-device copy per micro-batch).
        sizes = {r.num_tokens for r in records}
        if len(sizes) == 1:
            self.slots += float(sizes.pop() * self.num_experts)
        else:
            for i, r in enumerate(records):
                self.slots[i] += float(r.num_tokens * self.num_experts)
        self.loss_terms += torch.stack([r.loss_term.detach().float() for r in records])
        self.forwards += 1
        self.lm_loss += torch.stack([lm_loss_sum.detach().float(), lm_tokens.float()])

    def reduce(self, group: dist.ProcessGroup | None) -> ReducedRoutingStats:
        """Sum over the ranks of `group` (None: this process only) in one all-reduce."""
        packed = torch.cat(
            [
                self.active, self.slots, self.loss_terms, self.tokens_per_expert.flatten(),
                self.lm_loss, self.forwards,
            ]
        )
        if group is not None:
            dist.all_reduce(packed, group=group)
        L, N = self.num_layers, self.num_experts
        active, slots, loss_terms = packed[:L], packed[L : 2 * L], packed[2 * L : 3 * L]
        tokens_per_expert = packed[3 * L : 3 * L + L * N].view(L, N)
        lm_loss_sum, lm_tokens = packed[-3], packed[-2]
        forwards = packed[-1].clamp(min=1)
        layer_loss_term = loss_terms / forwards
        # `gates > 0` is False for a NaN gate, so a NaN router would read as 100 % sparse. The loss term
        # sums the layer's gates (or router probabilities), so it is NaN exactly then: report NaN.
        finite = torch.isfinite(layer_loss_term)
        nan = torch.full_like(layer_loss_term, float("nan"))
        layer_sparsity = torch.where(finite, 1.0 - active / slots.clamp(min=1), nan)
        sparsity = torch.where(finite.all(), 1.0 - active.sum() / slots.sum().clamp(min=1), nan[0])
        return ReducedRoutingStats(
            sparsity=sparsity,
            layer_sparsity=layer_sparsity,
            loss_term=layer_loss_term.mean(),
            layer_loss_term=layer_loss_term,
            tokens_per_expert=tokens_per_expert,
            lm_loss=lm_loss_sum / lm_tokens.clamp(min=1),
            num_experts=N,
        )
