"""Parallelism for the ReMoE model, applied from outside the model code (torchtitan's convention).

Order as torchtitan's llama4: expert parallelism -> activation checkpointing -> torch.compile per
block -> FSDP2. Each step reuses torchtitan:
- expert parallelism: torchtitan's `ExpertParallel` on every `moe.experts`, as `apply_moe_ep_tp` puts
  it, trimming a static-size pair buffer to the exchanged counts (`infra/expert_parallel.py`; weights
  become DTensors `Shard(0)` on the `ep` mesh; tokens travel by all-to-all with the per-expert counts
  of this step). The MoE layer hands the experts its expert-major list of active
  (token, expert) pairs with their counts, exactly what `ExpertParallel` dispatches, so ReLU
  routing's variable number of experts per token needs nothing special.
- activation checkpointing: `apply_ac` (none / full / selective per layer / selective per op).
- torch.compile: `infra/compile.py`.
- FSDP2 / HSDP: llama4's `apply_fsdp`, which shards the experts separately over the ranks that
  expert parallelism leaves (`efsdp`) and everything else over all data-parallel ranks.
See docs/scale-out.md.
"""


from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.models.llama4.infra.parallelize import apply_fsdp
from torchtitan.tools.logging import logger

from remoe_recipe.infra.checkpoint_layout import check_checkpoint_fits, checkpoint_to_resume
from remoe_recipe.infra.compile import apply_compile
from remoe_recipe.infra.expert_parallel import apply_expert_parallel
from remoe_recipe.infra.layout import check_layout
from remoe_recipe.routers import get_router
from remoe_recipe.platform import force_sum_reduction_for_gloo, init_like_one_process


def explicit_prefetch(model: nn.Module) -> None:
    """FSDP2 prefetches the next block's all-gather when it sees the next block's forward (or backward)
    begin; a host sync inside a block delays that. torchtitan therefore sets explicit prefetching under
    expert parallelism (its exchange syncs); ReMoE's MoE layer reads its pair count once per layer
    without EP too, so the same order is set here: each block prefetches the next in forward and the
    previous in backward, with the embeddings first and the norm + output last. Only modules FSDP
    wrapped are named; llama4's apply_fsdp does this for ep > 1 and returns earlier otherwise."""
    from torch.distributed.fsdp import FSDPModule

    blocks = [b for b in model.layers.values() if isinstance(b, FSDPModule)]
    if not blocks:
        return
    head = [m for m in (model.norm, model.output) if isinstance(m, FSDPModule)]
    if isinstance(model.tok_embeddings, FSDPModule):
        model.tok_embeddings.set_modules_to_forward_prefetch([blocks[0]])
    for block, nxt in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([nxt])
    if head:
        blocks[-1].set_modules_to_forward_prefetch(head)
        head[-1].set_modules_to_backward_prefetch([blocks[-1]])
    for block, prev in zip(blocks[1:], blocks[:-1]):
        block.set_modules_to_backward_prefetch([prev])
    if isinstance(model.tok_embeddings, FSDPModule):
        blocks[0].set_modules_to_backward_prefetch([model.tok_embeddings])


def parallelize_remoe(model: nn.Module, parallel_dims: ParallelDims, job_config) -> nn.Module:
    layout = check_layout(job_config, parallel_dims.world_size)
    logger.info(f"Parallel layout: {layout.describe()}")
    unsharded_model = (type(model), model.args)
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components

    if parallel_dims.ep_enabled:
        apply_expert_parallel(model, parallel_dims.get_mesh("ep"))
        logger.info(f"Applied expert parallelism: {layout.ep} expert shards, tokens exchanged by all-to-all")

    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_enabled,
            op_sac_save_list=_op_sac_save_list,
            base_folder=job_config.job.dump_folder,
        )

    if compile_enabled:
        apply_compile(model, job_config.compile)
        logger.info(f"Compiled each transformer block ({job_config.compile.backend})")

    if parallel_dims.fsdp_enabled:
        dp_names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        edp_names = ["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(dp_names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=False,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
            ep_degree=parallel_dims.ep,
            edp_mesh=parallel_dims.get_optional_mesh(edp_names),
        )
        force_sum_reduction_for_gloo(model)
        if not parallel_dims.ep_enabled and get_router(job_config.moe.router).variable_pairs:
            explicit_prefetch(model)
        logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")

    cls, args = unsharded_model
    init_like_one_process(model, lambda: cls(args))

    resume_from = checkpoint_to_resume(job_config.checkpoint, job_config.job.dump_folder)
    if resume_from is not None:
        check_checkpoint_fits(model, resume_from, layout)
    return model
