"""The ReMoE decoder: Llama-3-style attention blocks whose FFN is an MoE layer or a dense SwiGLU.

Module names follow torchtitan's llama3/llama4 (`tok_embeddings`, `layers` as a ModuleDict, `norm`,
`output`; blocks with `attention`, `attention_norm`, `ffn_norm`, and `moe` or `feed_forward`) so that
torchtitan's parallelize helpers apply to it.

Initialisation follows Megatron with --init-method-std 0.01 (the paper's): every weight ~ N(0, 0.01),
except the projections back into the residual stream (attention `wo`, FFN/expert `w2`), which use
0.01 / sqrt(2 * n_layers). RMSNorm weights start at 1.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.llama3.model.model import apply_rotary_emb
from torchtitan.protocols.train_spec import ModelProtocol

from remoe_recipe.routers import build_router

from .args import ReMoEModelArgs
from .moe import MoE, RouterRecord


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """Plain RoPE (no Llama-3.1 frequency scaling), as complex64 [max_seq_len, head_dim / 2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE, through SDPA."""

    def __init__(self, args: ReMoEModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis=freqs_cis[:seqlen])
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

    def init_weights(self, init_std: float, output_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.wo.weight, mean=0.0, std=output_std)


class FeedForward(nn.Module):
    """Dense SwiGLU FFN, no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float, output_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=output_std)


class TransformerBlock(nn.Module):
    def __init__(self, args: ReMoEModelArgs, layer_id: int = 0):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.moe_enabled = args.is_moe
        if self.moe_enabled:
            self.moe = MoE(
                dim=args.dim,
                expert_dim=args.expert_dim,
                router=build_router(args.moe.router, args, layer_id),
                use_grouped_mm=args.moe.expert_impl == "grouped_mm",
                pair_chunk_size=args.moe.pair_chunk_size,
                num_moe_layers=args.n_layers,
                router_init_std=args.moe.router_init_std,
            )
        else:
            self.feed_forward = FeedForward(args.dim, args.dense_ffn_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids [B, S]: the input tokens, for routers that route by token id (hash)."""
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        if self.moe_enabled:
            return h + self.moe(self.ffn_norm(h), token_ids)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init_std: float, output_std: float) -> None:
        self.attention.init_weights(init_std, output_std)
        (self.moe if self.moe_enabled else self.feed_forward).init_weights(init_std, output_std)
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()


class ReMoETransformer(ModelProtocol):
    def __init__(self, args: ReMoEModelArgs):
        super().__init__(args)
        if args.vocab_size is None:
            raise ValueError("vocab_size is unset: call ReMoEModelArgs.update_from_config first")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis", rope_frequencies(args.head_dim, args.max_seq_len, args.rope_theta),
            persistent=False,
        )

    def forward(self, tokens: torch.Tensor, attention_masks=None, positions=None) -> torch.Tensor:
        if attention_masks is not None or positions is not None:
            raise ValueError("ReMoETransformer uses causal SDPA: attention masks / positions are not supported")
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis, tokens)
        return self.output(self.norm(h))

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        args = self.args
        output_std = args.init_std / math.sqrt(2 * args.n_layers)
        device = buffer_device or self.freqs_cis.device
        with torch.device(device):
            self.freqs_cis = rope_frequencies(args.head_dim, args.max_seq_len, args.rope_theta)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=args.init_std)
        for layer in self.layers.values():
            layer.init_weights(args.init_std, output_std)
        self.norm.reset_parameters()
        nn.init.normal_(self.output.weight, mean=0.0, std=args.init_std)

    def get_attention_masks(self, *args, **kwargs):
        # torchtitan's Validator asks every model for masks and skips them on TypeError (causal SDPA).
        raise TypeError("ReMoETransformer uses causal SDPA and builds no attention masks")

    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.layers.values() if layer.moe_enabled]

    def pop_router_records(self) -> list[RouterRecord]:
        """Each MoE layer's record of the last forward, in layer order; clears them."""
        records = [moe.pop_record() for moe in self.moe_layers()]
        return [r for r in records if r is not None]
