"""The MoE layer: route, dispatch the active (token, expert) pairs, run the experts, combine.

Dropless and variable-k: the router's mask lists the active pairs, whatever their number (ReMoE gives a
token 0..N experts). Compute is proportional to the number of pairs, not to T * N. The experts are
torchtitan's `GroupedExperts` (weights w1/w3 [N, H, D], w2 [N, D, H]), so torchtitan's expert-parallel
style applies to them unchanged; only their forward is replaced to keep the input dtype (torchtitan's
grouped path always casts to bf16) and to choose the CPU or GPU permutation kernel by device.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.models.moe.kernels import generate_permute_indices
from torchtitan.models.moe.moe import GroupedExperts

from .router import ReLURouter, Routing, TopKRouter

# torch._grouped_mm on CUDA wants each expert's row count aligned; torchtitan pads to 8 for bf16.
GROUP_ALIGNMENT = 8


def _grouped_swiglu(w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    w1, w2, w3 = (w.to(x.dtype) for w in (w1, w2, w3))
    h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets))
    h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)


def _looped_swiglu(w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    """One SwiGLU per expert on its rows. Weights are unbound once rather than indexed per expert
    (torchtitan's loop): each `w[e]` would allocate a full-size weight gradient in backward."""
    counts = num_tokens_per_expert.tolist()  # host sync: the split sizes
    used = sum(counts)
    outs = [
        torch.matmul(F.silu(torch.matmul(xe, a.t())) * torch.matmul(xe, c.t()), b.t())
        for xe, a, b, c in zip(x[:used].split(counts), w1.unbind(0), w2.unbind(0), w3.unbind(0))
    ]
    out = torch.cat(outs) if outs else x.new_zeros((0, w2.shape[1]))
    # Rows past the experts' counts are expert-parallel padding: they stay zero.
    return torch.vstack((out, out.new_zeros((x.shape[0] - used, out.shape[-1]))))


def _run_aligned(fn, w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    """Pad every expert's rows to GROUP_ALIGNMENT (empty experts included), run, unpad.
    Same permutation as torchtitan's indices_padding_wrapper, with its CPU kernel on CPU."""
    num_experts = w1.shape[0]
    max_len = x.shape[0] + num_experts * GROUP_ALIGNMENT
    max_len = -(-max_len // GROUP_ALIGNMENT) * GROUP_ALIGNMENT
    with torch.no_grad():
        permuted, padded_counts, _ = generate_permute_indices(
            num_tokens_per_expert.to(torch.int32), num_experts, 1, max_len, GROUP_ALIGNMENT,
            use_cpu=x.device.type == "cpu",
        )
        permuted = permuted.to(x.device)
    num_rows = x.shape[0]
    # Padding slots (-1) read an appended zero row. index_select, not x[idx]: its backward is
    # index_add_, deterministic on CPU, where advanced-indexing's accumulate is not.
    gather = torch.where(permuted < 0, num_rows, permuted)
    x = torch.vstack((x, x.new_zeros((1, x.shape[-1]))))
    out = fn(w1, w2, w3, x.index_select(0, gather), padded_counts.to(x.device))
    # Each real row appears once in `permuted`: invert it to read the outputs back in order.
    slots = torch.arange(permuted.shape[0], device=x.device)
    real = permuted >= 0
    inverse = torch.empty(num_rows, dtype=torch.long, device=x.device)
    inverse[permuted[real].long()] = slots[real]
    return out.index_select(0, inverse)


class Experts(GroupedExperts):
    """torchtitan's GroupedExperts with a dtype-preserving grouped GEMM or a per-expert loop."""

    # The grouped GEMMs; torch.compile (infra/compile.py) swaps in a compiled twin per instance.
    grouped_swiglu = staticmethod(_grouped_swiglu)

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if isinstance(self.w1, DTensor):
            # Expert-parallel (or FSDP-gathered) weights: compute on the local shard.
            w1, w2, w3 = self.w1.to_local(), self.w2.to_local(), self.w3.to_local()
            expert_parallel = "ep" in (self.w1.device_mesh.mesh_dim_names or ())
        else:
            w1, w2, w3 = self.w1, self.w2, self.w3
            expert_parallel = False
        if not self.use_grouped_mm:
            return _looped_swiglu(w1, w2, w3, x, num_tokens_per_expert)
        if expert_parallel:  # the expert-parallel dispatch has already aligned the groups
            return self.grouped_swiglu(w1, w2, w3, x, num_tokens_per_expert)
        return _run_aligned(self.grouped_swiglu, w1, w2, w3, x, num_tokens_per_expert)

    def init_weights(self, init_std: float, output_std: float) -> None:
        nn.init.normal_(self.w1, mean=0.0, std=init_std)
        nn.init.normal_(self.w3, mean=0.0, std=init_std)
        nn.init.normal_(self.w2, mean=0.0, std=output_std)


@dataclass
class RouterRecord:
    """What one MoE layer reports for one forward, for the training loop to scale and aggregate."""

    loss_term: torch.Tensor  # 0-d fp32 with grad: Eq. 9/10 term (relu) or Switch aux term (topk)
    tokens_per_expert: torch.Tensor  # [N] fp32, detached: active pairs per expert
    num_tokens: int


def in_recompute() -> bool:
    """True while autograd is executing a backward pass. A module forward running then is an
    activation-checkpoint recompute (non-reentrant AC re-runs the forward with grad enabled)."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    def __init__(
        self,
        dim: int,
        expert_dim: int,
        num_experts: int,
        top_k: int,
        router: str,
        load_balance: bool,
        use_grouped_mm: bool,
    ):
        super().__init__()
        if router == "relu":
            self.router = ReLURouter(dim, num_experts, top_k, load_balance)
        elif router == "topk":
            self.router = TopKRouter(dim, num_experts, top_k)
        else:
            raise ValueError(f"moe.router = {router!r}: the MoE layer needs 'relu' or 'topk'")
        self.experts = Experts(dim, expert_dim, num_experts, use_grouped_mm)
        self.num_experts = num_experts
        # Set by each forward outside recompute; taken (and cleared) by `pop_record`.
        self.record: RouterRecord | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing: Routing = self.router(x)
        tokens_per_expert = routing.mask.sum(dim=0)
        # Expert-major list of active pairs: tokens of expert 0, then of expert 1, ...
        expert_idx, token_idx = routing.mask.t().nonzero(as_tuple=True)
        # index_select rather than advanced indexing: deterministic backward on CPU.
        routed_out = self.experts(x.index_select(0, token_idx), tokens_per_expert)
        flat_pair = token_idx * self.num_experts + expert_idx
        weights = routing.gates.flatten().index_select(0, flat_pair).unsqueeze(-1)
        # Tokens with no active expert keep a zero row: only the residual carries them.
        out = torch.zeros_like(x).index_add_(0, token_idx, (routed_out.float() * weights).to(x.dtype))
        if not in_recompute():
            self.record = RouterRecord(
                loss_term=routing.loss_term,
                tokens_per_expert=tokens_per_expert.detach().float(),
                num_tokens=x.shape[0],
            )
        return out.reshape(shape)

    def pop_record(self) -> RouterRecord | None:
        record, self.record = self.record, None
        return record

    def init_weights(self, init_std: float, output_std: float) -> None:
        nn.init.normal_(self.router.gate.weight, mean=0.0, std=init_std)
        self.experts.init_weights(init_std, output_std)
