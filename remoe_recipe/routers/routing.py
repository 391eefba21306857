"""What every routing module returns, and the base class the routers share.

A router maps tokens x [T, D] (and their token ids [T], for routers that route by id) to a dense gate
matrix [T, N] (zero where a token does not use an expert), the boolean mask of the (token, expert)
pairs that run, and the layer's auxiliary loss term (a mean over the T tokens; zero when the router
has none). The MoE layer (model/moe.py) dispatches the mask's pairs whatever their number.
"""

from dataclasses import dataclass

import torch
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


class Router(nn.Module):
    """A routing module over `num_experts` experts with `top_k` active per token on average."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k

    def num_pairs(self, num_tokens: int) -> int | None:
        """The number of active pairs for `num_tokens` tokens when the router fixes it (TopK: T * k), so
        the MoE layer needs no host read; None when only the mask knows (ReLU)."""
        return num_tokens * self.top_k

    def init_weights(self, init_std: float) -> None:
        gate = getattr(self, "gate", None)
        if gate is not None:
            nn.init.normal_(gate.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        raise NotImplementedError
