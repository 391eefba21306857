"""Routers: the only place where routing math lives.

Both routers map tokens x [T, D] to a dense gate matrix [T, N] (zero where a token does not use an
expert), the boolean routing mask, and the layer's auxiliary loss term (a mean over the T tokens):

- ReLURouter (ReMoE, paper Eq. 5): gates = ReLU(x W). No softmax, no bias, no renormalisation; a
  token may use any number of experts, including none. The loss term is the L1 of Eq. 9 or the
  load-balance-aware L1 of Eq. 10 with f treated as a constant; the training loop scales it by lambda.
- TopKRouter (the paper's baseline, Eq. 2): softmax over all N experts, then TopK, not renormalised,
  so k = 1 still gives the router a gradient. The loss term is the Switch-style load-balancing loss in
  its general-k form (the same expression Megatron's switch_load_balancing_loss_func computes).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    gates: torch.Tensor  # [T, N] fp32; zero outside the mask
    mask: torch.Tensor  # [T, N] bool; the (token, expert) pairs that run
    loss_term: torch.Tensor  # 0-d fp32, differentiable through the router


def load_balance_weights(mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """f_e = N / (k * T) * (tokens routed to e): an expert's activation rate relative to k / N.
    A constant (no gradient), as in the paper's Eq. 11."""
    num_tokens, num_experts = mask.shape
    counts = mask.sum(dim=0, dtype=torch.float32)
    return counts * (num_experts / (top_k * max(num_tokens, 1)))


class ReLURouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, load_balance: bool):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k  # only used by f in Eq. 10: k * G at granularity G
        self.load_balance = load_balance

    def forward(self, x: torch.Tensor) -> Routing:
        gates = F.relu(self.gate(x).float())
        mask = gates > 0
        num_tokens = max(x.shape[0], 1)
        if self.load_balance:
            f = load_balance_weights(mask, self.top_k)  # Eq. 10
            loss_term = (gates.sum(dim=0) * f).sum() / num_tokens
        else:
            loss_term = gates.sum() / num_tokens  # Eq. 9
        return Routing(gates=gates, mask=mask, loss_term=loss_term)


class TopKRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> Routing:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_probs, top_idx = torch.topk(probs, k=self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, top_idx, top_probs)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_idx, True)
        num_tokens = max(x.shape[0], 1)
        f = load_balance_weights(mask, self.top_k)
        loss_term = (probs.sum(dim=0) * f).sum() / num_tokens
        return Routing(gates=gates, mask=mask, loss_term=loss_term)

