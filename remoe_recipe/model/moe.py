"""The MoE layer: route, dispatch the active (token, expert) pairs, run the experts, combine.

Dropless and variable-k: the router's mask lists the active pairs, whatever their number (ReMoE gives a
token 0..N experts). Compute is proportional to the number of pairs, not to T * N. The experts are
torchtitan's `GroupedExperts` (weights w1/w3 [N, H, D], w2 [N, D, H]), so torchtitan's expert-parallel
style applies to them unchanged; only their forward is replaced to keep the input dtype (torchtitan's
grouped path always casts to bf16) and to pad expert groups only where the kernel needs it (CUDA).

Host synchronisations (docs/scale-out.md has the measured counts): the number of pairs P sizes every
buffer. TopK knows it statically (T * k); ReLU routing reads it once per layer forward, right after the
router, before any expert work is queued, or under expert parallelism passes a static T * E buffer that
the exchange trims when it reads its split sizes (infra/expert_parallel.py). Everything after is
static-shaped (no `nonzero`, no boolean-mask indexing, no host reads), and backward reads nothing: an
activation-checkpoint recompute reuses the P of its forward.

The combine accumulates the gate-weighted expert outputs in fp32 with `index_add_`: sequential (bitwise
reproducible) on CPU, and the deterministic sort-based kernel on CUDA under
`torch.use_deterministic_algorithms(True)` (torchtitan's `--debug.deterministic`).
"""

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from torchtitan.models.moe.moe import GroupedExperts

from remoe_recipe.routers.routing import Router, Routing

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


def _run_aligned(fn, w1, w2, w3, x, num_tokens_per_expert, alignment: int) -> torch.Tensor:
    """Pad every expert's rows to a multiple of `alignment` (empty experts get one aligned group, as
    torchtitan's generate_permute_indices does), run, read the real rows back in order.

    The padded layout is computed by arithmetic on the counts, with a static size (rows + N * alignment),
    so nothing reaches the host: slot j of expert e holds row starts[e] + (j - aligned_starts[e]) while
    that is below the expert's count, else the appended zero row. Same layout as torchtitan's
    indices_padding_wrapper, without its Triton kernel (GPU) or per-expert `.item()` loop (CPU twin)."""
    num_rows, num_experts = x.shape[0], w1.shape[0]
    max_len = -(-(num_rows + num_experts * alignment) // alignment) * alignment
    counts = num_tokens_per_expert.to(torch.int64)
    with torch.no_grad():
        aligned = torch.clamp_min((counts + alignment - 1) // alignment * alignment, alignment)
        aligned_ends = torch.cumsum(aligned, 0)
        aligned_starts, starts = aligned_ends - aligned, torch.cumsum(counts, 0) - counts
        # padded slot -> its expert -> the row it reads (slots past the last group read the zero row)
        slots = torch.arange(max_len, device=x.device)
        expert = torch.searchsorted(aligned_ends, slots, right=True).clamp_(max=num_experts - 1)
        within = slots - aligned_starts[expert]
        valid = (within < counts[expert]) & (slots < aligned_ends[-1])
        source = torch.where(valid, starts[expert] + within, num_rows)
        # real row -> its slot: rows are expert-major, so row r belongs to the expert whose range holds it
        rows = torch.arange(num_rows, device=x.device)
        row_expert = torch.searchsorted(torch.cumsum(counts, 0), rows, right=True).clamp_(max=num_experts - 1)
        row_slot = aligned_starts[row_expert] + rows - starts[row_expert]
    # Padding slots read an appended zero row. index_select, not x[idx]: its backward is index_add_,
    # deterministic on CPU (and on CUDA under use_deterministic_algorithms).
    x = torch.vstack((x, x.new_zeros((1, x.shape[-1]))))
    out = fn(w1, w2, w3, x.index_select(0, source), aligned.to(torch.int32))
    return out.index_select(0, row_slot)


def group_alignment(device: torch.device) -> int:
    """Row alignment of each expert's group for `torch._grouped_mm`: CUDA's kernel wants 16-byte
    aligned group offsets (8 rows in bf16, as torchtitan); the CPU kernel takes any offsets."""
    return GROUP_ALIGNMENT if device.type == "cuda" else 1


class Experts(GroupedExperts):
    """torchtitan's GroupedExperts with a dtype-preserving grouped GEMM or a per-expert loop."""

    # The grouped GEMMs; torch.compile (infra/compile.py) swaps in a compiled twin per instance.
    grouped_swiglu = staticmethod(_grouped_swiglu)
    # Group row alignment; None: by device (`group_alignment`). Tests set 8 to run the CUDA layout on CPU.
    align_rows: int | None = None
    # Set by the MoE layer around a call under expert parallelism, where it does not chunk: given the
    # rows this rank's experts received, whether to recompute the SwiGLU in backward instead of keeping
    # its activations (ReMoE's dense start).
    recompute_if = None

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if isinstance(self.w1, DTensor):
            # Expert-parallel (or FSDP-gathered) weights: compute on the local shard.
            w1, w2, w3 = self.w1.to_local(), self.w2.to_local(), self.w3.to_local()
            expert_parallel = "ep" in (self.w1.device_mesh.mesh_dim_names or ())
        else:
            w1, w2, w3 = self.w1, self.w2, self.w3
            expert_parallel = False
        if torch.is_autocast_enabled(x.device.type):
            # torch._grouped_mm is not on autocast's lists: run it in the autocast dtype (bf16 on a GPU)
            # rather than in the fp32 of the residual stream.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        swiglu = self.grouped_swiglu if self.use_grouped_mm else _looped_swiglu
        if self.recompute_if is not None and self.recompute_if(x.shape[0]):
            swiglu = functools.partial(checkpoint, swiglu, use_reentrant=False)
        alignment = self.align_rows or group_alignment(x.device)
        if not self.use_grouped_mm or expert_parallel or alignment == 1:
            return swiglu(w1, w2, w3, x, num_tokens_per_expert)  # EP's dispatch has aligned the groups
        return _run_aligned(swiglu, w1, w2, w3, x, num_tokens_per_expert, alignment)

    def init_weights(self, init_std: float, output_std: float) -> None:
        nn.init.normal_(self.w1, mean=0.0, std=init_std)
        nn.init.normal_(self.w3, mean=0.0, std=init_std)
        nn.init.normal_(self.w2, mean=0.0, std=output_std)


@dataclass
class RouterRecord:
    """What one MoE layer reports for one forward, for the training loop to scale and aggregate."""

    loss_term: torch.Tensor  # 0-d fp32 with grad: the router's loss term (Routing.loss_term)
    tokens_per_expert: torch.Tensor  # [N] fp32, detached: active pairs per expert
    num_tokens: int


def in_recompute() -> bool:
    """True while autograd is executing a backward pass. A module forward running then is an
    activation-checkpoint recompute (non-reentrant AC re-runs the forward with grad enabled)."""
    return torch._C._current_graph_task_id() != -1


def pair_bytes(dim: int, expert_dim: int, itemsize: int) -> int:
    """Bytes one active (token, expert) pair keeps for backward: the gathered input and the SwiGLU's four
    expert-width tensors (compute dtype), the expert output in fp32 (the gate's gradient), its indices."""
    return (dim + 4 * expert_dim) * itemsize + 4 * dim + 16


@functools.cache
def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device the activations live on (host RAM for CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def chunk_limit(
    pair_chunk_size: int, num_pairs: int, num_tokens: int, top_k: int, kept_bytes: float, memory_bytes: float
) -> int:
    """Pairs per chunk of the expert block, or 0 for no chunking (`[moe] pair_chunk_size`).
    n > 0: chunks of n whenever there are more than n pairs. -1 (auto): chunks of T * k pairs when a
    micro-batch routes more than 2 * T * k (ReMoE's dense start; TopK and stage III route about T * k)
    and keeping every MoE layer's pairs (`kept_bytes`) would take more than half the device's memory."""
    if pair_chunk_size > 0:
        return pair_chunk_size if num_pairs > pair_chunk_size else 0
    if pair_chunk_size == 0 or num_pairs <= 2 * num_tokens * top_k:
        return 0
    return num_tokens * top_k if kept_bytes > memory_bytes / 2 else 0


class MoE(nn.Module):
    """An MoE layer around a routing module (remoe_recipe.routers): any router, any number of pairs."""

    def __init__(
        self,
        dim: int,
        expert_dim: int,
        router: Router,
        use_grouped_mm: bool,
        pair_chunk_size: int = -1,
        num_moe_layers: int = 1,
        router_init_std: float | None = None,
    ):
        super().__init__()
        self.router = router
        self.experts = Experts(dim, expert_dim, router.num_experts, use_grouped_mm)
        self.num_experts = router.num_experts
        self.top_k = router.top_k
        self.pair_chunk_size = pair_chunk_size
        self.num_moe_layers = num_moe_layers  # the memory the auto chunking weighs is all layers'
        self.router_init_std = router_init_std  # None: the model's init std (the paper)
        # Set by each forward outside recompute; taken (and cleared) by `pop_record`.
        self.record: RouterRecord | None = None
        # The last forward's number of pairs, for its activation-checkpoint recompute (no host read
        # in backward). One slot: a micro-batch's backward follows its forward (no pipelining).
        self._forward_pairs: int | None = None
        # How many chunks the last forward ran the experts in (1: unchunked); for tests and benchmarks.
        self.last_num_chunks = 0

    def _num_pairs(self, static_pairs: int | None, tokens_per_expert: torch.Tensor) -> int:
        if in_recompute() and self._forward_pairs is not None:
            return self._forward_pairs
        # The router fixes the count (TopK: T * k; no host read), or only its mask knows (ReLU): then
        # this is the layer's one host sync.
        pairs = static_pairs
        if pairs is None:
            pairs = int(tokens_per_expert.sum())
        self._forward_pairs = pairs
        return pairs

    def _expert_parallel(self) -> bool:
        w = self.experts.w1
        return isinstance(w, DTensor) and "ep" in (w.device_mesh.mesh_dim_names or ())

    def _chunk_limit(self, x: torch.Tensor, num_pairs: int, num_tokens: int) -> int:
        if self.pair_chunk_size != -1:
            return chunk_limit(self.pair_chunk_size, num_pairs, num_tokens, self.top_k, 0, 0)
        device = x.device.type
        itemsize = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype).itemsize
        w = self.experts.w1
        kept = num_pairs * pair_bytes(w.shape[2], w.shape[1], itemsize) * self.num_moe_layers
        return chunk_limit(-1, num_pairs, num_tokens, self.top_k, kept, device_memory_bytes(x.device))

    def _weighted_outputs(self, x, gates, token_idx, expert_idx, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """(token of each pair [P], each pair's expert output times its gate [P, D] fp32)."""
        routed_out = self.experts(x.index_select(0, token_idx), counts)
        # A trimming exchange returns only the real pairs of a static-size list: its rows are P.
        num_pairs = routed_out.shape[0]
        token_idx, expert_idx = token_idx[:num_pairs], expert_idx[:num_pairs]
        weights = gates.flatten().index_select(0, token_idx * self.num_experts + expert_idx)
        return token_idx, routed_out.float() * weights.unsqueeze(-1)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D]; token_ids [...] the tokens' ids, for routers that route by id (hash)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        num_tokens = x.shape[0]
        routing: Routing = self.router(x, token_ids.reshape(-1) if token_ids is not None else None)
        tokens_per_expert = routing.mask.sum(dim=0)
        expert_parallel = self._expert_parallel()
        # (torch.compile wraps the router; its attributes pass through.)
        static_pairs = self.router.num_pairs(num_tokens)
        if expert_parallel and static_pairs is None and getattr(self.experts, "exchange_trims_rows", False):
            # The exchange reads the pair count with its split sizes (infra/expert_parallel.py): pass
            # every pair a token could have, the real ones first, and let it trim. No read here.
            num_pairs = num_tokens * self.num_experts
        else:
            num_pairs = self._num_pairs(static_pairs, tokens_per_expert)
        # Expert-major list of active pairs: tokens of expert 0, then of expert 1, ... (static size;
        # past the real pairs, under the exchange's bound, (0, 0) fills that are never sent)
        expert_idx, token_idx = torch.nonzero_static(routing.mask.t(), size=num_pairs, fill_value=0).unbind(1)
        # The gate-weighted combine sums in fp32. Tokens with no active expert keep a zero row: only
        # the residual carries them.
        out = x.new_zeros(x.shape, dtype=torch.float32)
        if expert_parallel:
            # No chunks: every chunk would be one exchange, and ranks with different pair counts would run
            # different numbers of them (a collective mismatch). The experts decide, from the rows they
            # received, whether to recompute their SwiGLU in backward instead.
            self.experts.recompute_if = lambda rows: bool(self._chunk_limit(x, rows, num_tokens))
            try:
                out.index_add_(0, *self._weighted_outputs(x, routing.gates, token_idx, expert_idx,
                                                          tokens_per_expert))
            finally:
                self.experts.recompute_if = None
            self.last_num_chunks = 1
        elif not (limit := self._chunk_limit(x, num_pairs, num_tokens)):
            out.index_add_(0, *self._weighted_outputs(x, routing.gates, token_idx, expert_idx,
                                                      tokens_per_expert))
            self.last_num_chunks = 1
        else:
            out = self._chunked(out, x, routing.gates, token_idx, expert_idx, tokens_per_expert, limit)
        if not in_recompute():
            self.record = RouterRecord(
                loss_term=routing.loss_term,
                tokens_per_expert=tokens_per_expert.detach().float(),
                num_tokens=num_tokens,
            )
        return out.to(x.dtype).reshape(shape)

    def _chunked(self, out, x, gates, token_idx, expert_idx, tokens_per_expert, limit) -> torch.Tensor:
        """Bounded memory for ReMoE's dense start: the pairs go through the experts `limit` at a time,
        and each chunk is recomputed in backward rather than keeping its activations, so the memory
        a layer holds is its input and gates (not per-pair activations), and the recompute's peak is
        one chunk's. The fp32 sums run in the same order as the unchunked index_add_."""
        ends = torch.cumsum(tokens_per_expert, 0)
        starts = ends - tokens_per_expert
        num_pairs = token_idx.shape[0]
        self.last_num_chunks = 0
        for lo in range(0, num_pairs, limit):
            hi = min(lo + limit, num_pairs)
            # each expert's pairs inside [lo, hi): pairs are expert-major
            counts = ends.clamp(lo, hi) - starts.clamp(lo, hi)
            tok, exp = token_idx[lo:hi], expert_idx[lo:hi]
            out = out.index_add(0, *checkpoint(self._weighted_outputs, x, gates, tok, exp, counts,
                                               use_reentrant=False))
            self.last_num_chunks += 1
        return out

    def pop_record(self) -> RouterRecord | None:
        record, self.record = self.record, None
        return record

    def init_weights(self, init_std: float, output_std: float) -> None:
        self.router.init_weights(init_std if self.router_init_std is None else self.router_init_std)
        self.experts.init_weights(init_std, output_std)
