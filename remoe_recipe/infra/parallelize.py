"""Parallelism for the ReMoE model, applied from outside the model code (torchtitan's convention).

Order as torchtitan's llama4: activation checkpointing -> torch.compile per block -> FSDP2.
Expert parallelism is not wired yet (tracked by the scale-out issue); a layout asking for it fails at
start-up instead of silently training without it.
"""

import torch
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.models.llama4.infra.parallelize import apply_fsdp
from torchtitan.tools.logging import logger

from remoe_recipe.config import ConfigError
from remoe_recipe.platform import force_sum_reduction_for_gloo


def check_layout(parallel_dims: ParallelDims, job_config) -> None:
    """Refuse layouts this recipe does not run, in one line naming the key."""
    p = job_config.parallelism
    for key in ("tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree"):
        if getattr(p, key) != 1:
            raise ConfigError(f"parallelism.{key} = {getattr(p, key)}: ReMoE recipe supports only 1")
    if p.expert_parallel_degree != 1:
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {p.expert_parallel_degree}: expert parallelism "
            "is not available yet; use FSDP (parallelism.data_parallel_shard_degree)"
        )


def parallelize_remoe(model: nn.Module, parallel_dims: ParallelDims, job_config) -> nn.Module:
    check_layout(parallel_dims, job_config)
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components

    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_enabled,
            op_sac_save_list=_op_sac_save_list,
            base_folder=job_config.job.dump_folder,
        )

    if compile_enabled:
        # Not fullgraph: the MoE's (token, expert) pair list has a data-dependent length.
        for layer_id, block in model.layers.named_children():
            model.layers.register_module(
                layer_id, torch.compile(block, backend=job_config.compile.backend)
            )
        logger.info("Compiled each transformer block with torch.compile")

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=False,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        force_sum_reduction_for_gloo(model)
        logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")
    elif parallel_dims.dp_replicate_enabled:
        raise ConfigError(
            "parallelism.data_parallel_replicate_degree > 1 needs data_parallel_shard_degree > 1 "
            "(HSDP); plain DDP is not supported"
        )
    return model
