"""Model arguments, the flavors, and parameter / FLOP accounting.

Every flavor is a Llama-3-style decoder as the ReMoE paper trains it (§4.1, Table 1): RMSNorm (eps 1e-5),
RoPE with theta 1e6, GQA, SwiGLU with ffn = 4 * dim, no biases, untied embeddings, init std 0.01,
and an MoE (or dense FFN) in every layer. The `[moe]` TOML section chooses the FFN kind.
"""

import copy
from dataclasses import dataclass, field

from torch import nn
from torchtitan.protocols.model import BaseModelArgs

from remoe_recipe.config import ConfigError, MoEConfig, moe_problems
from remoe_recipe.routers import get_router

VOCAB_MULTIPLE = 1024


def padded_vocab_size(n_vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """GPT-2's 50257 -> 51200, as Megatron's --make-vocab-size-divisible-by 1024."""
    return -(-n_vocab // multiple) * multiple


@dataclass
class ParamCounts:
    """Parameters of one model, split the way MoE users reason about them."""

    embedding: int  # input embedding table
    output: int  # untied output projection
    attention: int  # all layers, norms included
    router: int  # all layers
    ffn_total: int  # all experts (or the dense FFN) of all layers
    ffn_per_expert_per_layer: int  # one expert of one layer (dense: the whole FFN)
    final_norm: int

    @property
    def total(self) -> int:
        return (
            self.embedding + self.output + self.attention + self.router
            + self.ffn_total + self.final_norm
        )


@dataclass
class ReMoEModelArgs(BaseModelArgs):
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 1024
    vocab_size: int | None = None
    """None: follow the tokenizer, padded to a multiple of 1024. An int fixes it (paper flavors: 51200)."""
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    init_std: float = 0.01
    max_seq_len: int = 1024
    moe: MoEConfig = field(default_factory=MoEConfig)
    flavor: str = ""

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        """Whether the FFN is a mixture of experts (every registered router but the dense baseline)."""
        return get_router(self.moe.router).has_experts

    @property
    def num_routed_experts(self) -> int:
        """E * G: fine-grained experts per layer."""
        return self.moe.num_experts * self.moe.granularity

    @property
    def routed_top_k(self) -> int:
        """k * G: TopK's choices per token; ReMoE's expected active experts per token at target."""
        return self.moe.top_k * self.moe.granularity

    @property
    def expert_dim(self) -> int:
        """Width of one (fine-grained) expert: ffn / G."""
        return self.ffn_dim // self.moe.granularity

    @property
    def dense_ffn_dim(self) -> int:
        return self.ffn_dim * self.moe.ffn_expansion

    @property
    def target_sparsity(self) -> float:
        """ReMoE's target fraction of zero gates, 1 - k/E (unchanged by granularity)."""
        return 1.0 - self.moe.top_k / self.moe.num_experts

    # ---- torchtitan hooks -----------------------------------------------------------------
    def problems(self) -> list[str]:
        """The [moe] values, then how they fit the flavor: one line per problem."""
        problems = moe_problems(self.moe)
        if problems:
            return problems
        if self.dim % self.n_heads:
            problems.append(f"flavor {self.flavor!r}: dim {self.dim} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"flavor {self.flavor!r}: n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.is_moe and self.ffn_dim % self.moe.granularity:
            problems.append(
                f"moe.granularity = {self.moe.granularity} does not divide the FFN width "
                f"{self.ffn_dim} of flavor {self.flavor!r}"
            )
        return problems

    def validate(self) -> None:
        """torchtitan's hook, also run when a model is built outside the trainer (export, tests)."""
        if problems := self.problems():
            raise ConfigError("\n".join(problems))

    def update_from_config(self, job_config, **kwargs) -> None:
        """Take the [moe] section, the sequence length and the tokenizer's vocabulary."""
        moe = getattr(job_config, "moe", None)
        if moe is None:
            raise ConfigError(
                "the [moe] section is missing: set [job] custom_config_module = "
                "\"remoe_recipe.config\" (remoe_recipe.train adds it automatically)"
            )
        self.moe = copy.deepcopy(moe)
        self.max_seq_len = job_config.training.seq_len
        self.validate()
        tokenizer_vocab = kwargs.get("tokenizer_vocab_size")
        if tokenizer_vocab is None:
            from remoe_recipe.data.tokenizer import build_tiktoken_tokenizer

            tokenizer_vocab = build_tiktoken_tokenizer(job_config).get_vocab_size()
        if self.vocab_size is None:
            self.vocab_size = padded_vocab_size(tokenizer_vocab)
        elif tokenizer_vocab > self.vocab_size:
            raise ConfigError(
                f"model.tokenizer_path: the tokenizer has {tokenizer_vocab} tokens but flavor "
                f"{self.flavor!r} fixes vocab_size = {self.vocab_size}"
            )

    def param_counts(self) -> ParamCounts:
        """Analytical parameter count (tests check it against the built model)."""
        d, L = self.dim, self.n_layers
        vocab = self.vocab_size or 0
        attn_per_layer = d * self.n_heads * self.head_dim * 2 + d * self.n_kv_heads * self.head_dim * 2
        attention = L * (attn_per_layer + 2 * d)  # two RMSNorm weights per block
        if self.is_moe:
            per_expert = 3 * d * self.expert_dim
            ffn_total = L * self.num_routed_experts * per_expert
            router = L * d * self.num_routed_experts
        else:
            per_expert = 3 * d * self.dense_ffn_dim
            ffn_total = L * per_expert
            router = 0
        return ParamCounts(
            embedding=vocab * d,
            output=vocab * d,
            attention=attention,
            router=router,
            ffn_total=ffn_total,
            ffn_per_expert_per_layer=per_expert,
            final_norm=d,
        )

    def active_params(self, active_experts_per_token: float | None = None) -> float:
        """Parameters one token passes through. For MoE, `active_experts_per_token` per layer
        (ReMoE: (1 - measured sparsity) * E * G); default: the target k * G."""
        c = self.param_counts()
        if not self.is_moe:
            return float(c.total)
        if active_experts_per_token is None:
            active_experts_per_token = float(self.routed_top_k)
        active_ffn = self.n_layers * active_experts_per_token * c.ffn_per_expert_per_layer
        return float(c.total - c.ffn_total + active_ffn)

    def flops_per_token(self, seq_len: int, active_experts_per_token: float | None = None) -> float:
        """Training FLOPs per token in torchtitan's convention: 6 * (active params without the input
        embedding) + the attention score/value matmuls (6 * L * heads * 2 * head_dim * seq_len)."""
        matmul_params = self.active_params(active_experts_per_token) - self.param_counts().embedding
        attention = 6 * self.n_layers * self.n_heads * 2 * self.head_dim * seq_len
        return 6 * matmul_params + attention

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        nparams = sum(p.numel() for p in model.parameters())
        return nparams, int(self.flops_per_token(seq_len))


def _paper(dim: int, n_layers: int, n_heads: int, flavor: str) -> ReMoEModelArgs:
    # Paper Table 1 / official scripts: 4 GQA groups, ffn = 4 * dim, GPT-2 vocab padded to 51200.
    return ReMoEModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=4, ffn_dim=4 * dim,
        vocab_size=51200, flavor=flavor,
    )


def remoe_flavors() -> dict[str, ReMoEModelArgs]:
    return {
        # A few seconds per step on a laptop CPU, even in ReMoE's dense stage (all experts active).
        "debugmodel": ReMoEModelArgs(
            dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, flavor="debugmodel"
        ),
        # The paper's shape (GQA, ffn = 4 * dim, head dim 64) at a third of 182M's width and half its
        # depth: about 4x the debug model's FLOPs per token (docs/training-dynamics.md compares them).
        "mini": ReMoEModelArgs(
            dim=256, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=1024, flavor="mini"
        ),
        "182M": _paper(768, 12, 12, "182M"),
        "469M": _paper(1024, 24, 16, "469M"),
        "978M": _paper(1536, 24, 16, "978M"),
    }
