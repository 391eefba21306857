"""The parallel layout a run asks for, resolved for a world size and checked before any training.

torchtitan builds two meshes over the same ranks (its ParallelDims): a dense one,
`[dp_replicate, fsdp]`, for everything but the routed experts, and a sparse one,
`[dp_replicate, efsdp, ep]`, for the experts. Expert parallelism borrows data-parallel ranks: the
`ep` ranks of one FSDP group each hold 1/ep of the experts and exchange tokens by all-to-all, and
the experts are FSDP-sharded over the remaining `efsdp = dp_shard / ep` ranks.

Every check here fails with a ConfigError whose message names the key, in one line: the config check
(`validate.py`) runs it at parse time, for torchrun's WORLD_SIZE or the dry run's --world_size, and
`parallelize_remoe` again as a guard with the world size of the process group it is given.
"""

from dataclasses import dataclass

from remoe_recipe.config import ConfigError
from remoe_recipe.routers import get_router

# Op-level selective AC + FSDP + EP > 1 fails in PyTorch's backward (torchtitan issue #3427).
OP_SAC_EP_ERROR = (
    "activation_checkpoint.selective_ac_option = 'op' with parallelism.expert_parallel_degree = {ep} "
    "fails inside PyTorch's backward ('_record_function_enter_new ... not found in storage', "
    "torchtitan #3427); use activation_checkpoint.mode = 'full', or mode = 'selective' with "
    "selective_ac_option = '1' (every layer) or '2' (every 2nd layer), or expert_parallel_degree = 1"
)


@dataclass(frozen=True)
class Layout:
    world_size: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def efsdp(self) -> int:
        """Ranks over which each expert-parallel shard of the experts is FSDP-sharded."""
        return self.dp_shard // self.ep

    @property
    def data_parallel(self) -> int:
        """Ranks holding distinct tokens (torchtitan's `batch` / `loss` mesh)."""
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        text = f"{ranks}: dp_shard={self.dp_shard}"
        if self.dp_replicate > 1:
            text += f" x dp_replicate={self.dp_replicate}"
        if self.ep > 1:  # otherwise the experts are sharded with their block, like everything else
            text += f"; experts ep={self.ep} x efsdp={self.efsdp}"
        return text


def resolve_layout(parallelism, world_size: int) -> Layout:
    """torchtitan's degrees for `world_size` ranks (dp_shard = -1 takes the rest), or ConfigError."""
    p = parallelism
    for key in ("tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree",
                "expert_tensor_parallel_degree"):
        if getattr(p, key) != 1:
            raise ConfigError(f"parallelism.{key} = {getattr(p, key)}: the ReMoE recipe supports only 1")
    if p.expert_parallel_comm_backend != "standard":
        raise ConfigError(
            f"parallelism.expert_parallel_comm_backend = {p.expert_parallel_comm_backend!r}: "
            "the ReMoE recipe supports only 'standard' (all-to-all over torch.distributed)"
        )
    for key in ("data_parallel_replicate_degree", "expert_parallel_degree"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallelism.{key} = {getattr(p, key)}: expected >= 1")
    dp_replicate, dp_shard = p.data_parallel_replicate_degree, p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % dp_replicate:
            raise ConfigError(
                f"parallelism.data_parallel_replicate_degree = {dp_replicate} does not divide "
                f"the {world_size} ranks"
            )
        dp_shard = world_size // dp_replicate
    elif dp_shard < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {dp_shard}: expected -1 or >= 1")
    if dp_replicate * dp_shard != world_size:
        raise ConfigError(
            f"parallelism.data_parallel_replicate_degree ({dp_replicate}) x data_parallel_shard_degree "
            f"({dp_shard}) = {dp_replicate * dp_shard}, but there are {world_size} ranks"
        )
    return Layout(world_size, dp_replicate, dp_shard, p.expert_parallel_degree)


def check_layout(job_config, world_size: int) -> Layout:
    """Resolve the layout and refuse what cannot run, naming the key."""
    layout = resolve_layout(job_config.parallelism, world_size)
    moe = job_config.moe
    if layout.dp_replicate > 1 and layout.dp_shard == 1:
        raise ConfigError(
            f"parallelism.data_parallel_replicate_degree = {layout.dp_replicate} with "
            "data_parallel_shard_degree = 1 is plain DDP, which this recipe does not run; "
            "use data_parallel_shard_degree > 1 (FSDP, or HSDP together with replicate)"
        )
    ep = layout.ep
    if ep > 1:
        if not get_router(moe.router).has_experts:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep}: moe.router = {moe.router!r} has no experts to distribute"
            )
        num_experts = moe.num_experts * moe.granularity
        if num_experts % ep:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} does not divide the {num_experts} experts "
                f"per layer (moe.num_experts {moe.num_experts} x moe.granularity {moe.granularity})"
            )
        if layout.dp_shard % ep:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} does not divide the {layout.dp_shard} "
                "FSDP ranks (parallelism.data_parallel_shard_degree): experts borrow data-parallel ranks"
            )
        ac = job_config.activation_checkpoint
        if ac.mode == "selective" and ac.selective_ac_option == "op":
            raise ConfigError(OP_SAC_EP_ERROR.format(ep=ep))
    ac = job_config.activation_checkpoint
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if ac.mode == "memory_budget" and not compile_model:
        raise ConfigError("activation_checkpoint.mode = 'memory_budget' needs compile.enable (and 'model' in compile.components)")
    training = job_config.training
    batch = training.local_batch_size * layout.data_parallel
    if training.global_batch_size > 0 and training.global_batch_size % batch:
        raise ConfigError(
            f"training.global_batch_size = {training.global_batch_size} is not a multiple of "
            f"training.local_batch_size ({training.local_batch_size}) x {layout.data_parallel} data-parallel ranks"
        )
    return layout
