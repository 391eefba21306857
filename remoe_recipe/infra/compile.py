"""torch.compile per transformer block, shaped like torchtitan's llama4 `apply_compile`.

A dense block compiles whole (fullgraph). An MoE block compiles its parts, not its MoE dispatch:
the list of active (token, expert) pairs has a data-dependent length (`nonzero`), expert parallelism
syncs split sizes to the host, and the experts carry their own FSDP / expert-parallel hooks; keeping
that glue eager also keeps the MoE's record-once-per-forward logic (it asks autograd whether a
checkpoint recompute is running) outside any graph. What is compiled:
  attention, attention_norm, ffn_norm, the router   fullgraph, static shapes
  the experts' grouped SwiGLU                       fullgraph, row count dynamic
The number of rows the experts see changes every step (the routing changes; under expert parallelism
also the tokens received from other ranks). It is marked dynamic, so one graph serves every count
instead of a recompilation per step.
"""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torchtitan.config.job_config import Compile as CompileConfig

from remoe_recipe.model.moe import Experts


def dynamic_rows(fn, backend: str):
    """Compile `fn(w1, w2, w3, x, counts)` once for any number of rows of x."""
    compiled = torch.compile(fn, backend=backend, fullgraph=True)

    def run(w1, w2, w3, x, num_tokens_per_expert):
        torch._dynamo.mark_dynamic(x, 0)
        return compiled(w1, w2, w3, x, num_tokens_per_expert)

    return run


def apply_compile(model: nn.Module, compile_config: CompileConfig) -> None:
    backend = compile_config.backend
    grouped_swiglu = dynamic_rows(Experts.grouped_swiglu, backend)
    for layer_id, block in model.layers.named_children():
        inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
        if not inner.moe_enabled:
            model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=True))
            continue
        for name, child in inner.named_children():
            if name != "moe":
                setattr(inner, name, torch.compile(child, backend=backend, fullgraph=True))
        moe = inner.moe
        moe.router = torch.compile(moe.router, backend=backend, fullgraph=True)
        # The per-expert loop (expert_impl = "loop") stays eager: its split sizes are host values.
        moe.experts.grouped_swiglu = grouped_swiglu
