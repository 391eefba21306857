"""Hugging Face model of a ReMoE-recipe checkpoint (remote code, copied beside exported weights).

A Llama-style decoder (RMSNorm, RoPE with rotate_half, grouped-query attention, SwiGLU) whose FFN is a
mixture of experts routed by
- "relu" (ReMoE, arXiv 2412.14711 Eq. 5): gates = ReLU(x W_r); a token uses every expert with a
  positive gate, possibly none (then the layer adds nothing to the residual);
- "topk" (the paper's baseline, Eq. 2): softmax over all experts, the top k kept, not renormalised.
Routing is computed in fp32 whatever the weights' dtype: a ReLU gate's sign decides if an expert runs.

Self-contained (torch + stable transformers API only). No KV cache: generation re-runs the prefix,
which is simple and exact, and fast enough for the small models the recipe trains on one machine.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_remoe import ReMoEConfig
except ImportError:  # imported as a plain module (the recipe's own tests)
    from configuration_remoe import ReMoEConfig


class ReMoERMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ReMoEAttention(nn.Module):
    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class ReMoEExpert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReMoESparseMoE(nn.Module):
    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.router, self.top_k = config.router, config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            ReMoEExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.last_experts_per_token: torch.Tensor | None = None  # [batch, seq], for inspection

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x).float()
        if self.router == "relu":
            gates = F.relu(logits)
            mask = gates > 0
        else:
            probs = F.softmax(logits, dim=-1)
            top, idx = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter(1, idx, top)
            mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, True)
        self.last_experts_per_token = mask.sum(-1).reshape(shape[:-1])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = mask[:, e].nonzero().squeeze(-1)
            if rows.numel():
                y = expert(x.index_select(0, rows)).float() * gates[rows, e, None]
                out.index_add_(0, rows, y.to(x.dtype))
        return out.reshape(shape)


class ReMoEDecoderLayer(nn.Module):
    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.self_attn = ReMoEAttention(config)
        self.mlp = ReMoESparseMoE(config)
        self.input_layernorm = ReMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ReMoERMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class ReMoEPreTrainedModel(PreTrainedModel):
    config_class = ReMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["ReMoEDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ReMoERMSNorm):
            nn.init.ones_(module.weight)


class ReMoEModel(ReMoEPreTrainedModel):
    def __init__(self, config: ReMoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ReMoEDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = ReMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def rope(self, positions: torch.Tensor):
        """cos/sin [batch, 1, seq, head_dim] for integer positions [batch, seq]."""
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
        angles = positions.float()[..., None] * inv_freq
        emb = torch.cat((angles, angles), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        h = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Padding (left or right): positions count real tokens; a query sees real keys up to itself.
            keep = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
            mask = causal[None, None] & keep[:, None, None, :]
            mask = mask | torch.eye(t, dtype=torch.bool, device=h.device)[None, None]  # no empty rows
        else:
            positions = torch.arange(t, device=h.device).expand(b, t)
        cos, sin = self.rope(positions)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)


class ReMoEForCausalLM(ReMoEPreTrainedModel, GenerationMixin):
    def __init__(self, config: ReMoEConfig):
        super().__init__(config)
        self.model = ReMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
