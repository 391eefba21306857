"""Hugging Face configuration of a ReMoE-recipe model (remote code, copied beside exported weights).

Self-contained: imports only transformers, so `AutoConfig.from_pretrained(DIR, trust_remote_code=True)`
works without the recipe installed.
"""

from transformers import PretrainedConfig


class ReMoEConfig(PretrainedConfig):
    model_type = "remoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 51200,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        router: str = "relu",  # "relu" (ReMoE), "topk" (softmax -> top-k, not renormalised)
        num_experts: int = 8,  # experts per layer (E * G at granularity G)
        num_experts_per_tok: int = 1,  # topk's k * G; relu: only the training target
        moe_intermediate_size: int = 3072,  # one expert's width (ffn / G)
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        max_position_embeddings: int = 1024,
        initializer_range: float = 0.01,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if router not in ("relu", "topk"):
            raise ValueError(f"router = {router!r}: expected 'relu' or 'topk'")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.router = router
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
