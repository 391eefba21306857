"""Dry run: validate a config for a world size without that hardware, and report what each rank holds.

    python -m remoe_recipe.dryrun --job.config_file train_configs/paper_182M_remoe.toml --world_size 8 \
        [--parallelism.expert_parallel_degree 8] [--section.key value ...]

One process plays rank 0 of `--world_size` ranks on torchtitan's fake communication backend
(`--comm.mode fake_backend`: collectives are no-ops). It runs the recipe's config checks, builds the
device meshes, builds the model on the meta device (no memory) and applies the real parallelize
function (expert parallelism, activation checkpointing, compile wrappers, FSDP2), then prints the
meshes, the parameters one rank holds and an estimate of its memory. Nothing is trained, no weight is
allocated, no kernel is compiled. Exit status 2 with `config error: ...` for a layout that fails.
"""

import copy
import os
import sys
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims, utils as dist_utils
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.logging import init_logger, logger
from torchtitan.tools.utils import set_default_dtype

from remoe_recipe.config import ConfigError
from remoe_recipe.infra.layout import resolve_layout
from remoe_recipe.model.moe import chunk_limit, pair_bytes as moe_pair_bytes
from remoe_recipe.platform import enable_cpu_training
from remoe_recipe.preflight import load_config
from remoe_recipe.routers import get_router

GiB = 2**30


def _take_world_size(argv: list[str]) -> tuple[int, list[str]]:
    rest, world_size = [], None
    it = iter(argv)
    for arg in it:
        if arg in ("--world_size", "--world-size"):
            world_size = next(it, None)
        elif arg.startswith(("--world_size=", "--world-size=")):
            world_size = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if world_size is None or not str(world_size).isdigit() or int(world_size) < 1:
        raise ConfigError(f"--world_size = {world_size}: the dry run needs the number of ranks to check (>= 1)")
    return int(world_size), rest


@dataclass
class RankParams:
    dense: int = 0  # parameters sharded over all data-parallel ranks
    experts: int = 0  # routed experts: expert-parallel shard, FSDP-sharded over efsdp
    dense_unsharded_block: int = 0  # largest block's non-expert parameters, all-gathered by FSDP
    experts_unsharded_block: int = 0  # one layer's expert-parallel shard, all-gathered over efsdp

    @property
    def total(self) -> int:
        return self.dense + self.experts


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def count_rank_params(model: torch.nn.Module, efsdp: int) -> RankParams:
    """Parameters rank 0 holds (a DTensor's local shard), and what FSDP gathers for one block."""
    counts = RankParams()
    for name, p in model.named_parameters():
        if ".moe.experts." in name:
            counts.experts += _local_numel(p)
        else:
            counts.dense += _local_numel(p)
    for block in model.layers.values():
        params = [(f".{n}", p) for n, p in block.named_parameters()]
        # a DTensor's numel is its global size: what FSDP all-gathers of the block's dense part
        dense = sum(p.numel() for n, p in params if ".moe.experts." not in n)
        # the experts FSDP gathers are this rank's expert-parallel shard, over efsdp ranks
        experts = sum(_local_numel(p) * efsdp for n, p in params if ".moe.experts." in n)
        counts.dense_unsharded_block = max(counts.dense_unsharded_block, dense)
        counts.experts_unsharded_block = max(counts.experts_unsharded_block, experts)
    return counts


# The device the auto chunking of `[moe] pair_chunk_size` is estimated for (the layer reads the real one).
ASSUMED_DEVICE_GIB = 80


def pair_bytes(args, b: int) -> float:
    """Bytes one active (token, expert) pair keeps for backward in the MoE layer (`moe.pair_bytes`)."""
    return moe_pair_bytes(args.dim, args.expert_dim, b)


def chunk_pairs(args, size: int, tokens: int, active_per_token: float, b: int) -> int:
    """Pairs per chunk if the MoE layer chunks at this density (`[moe] pair_chunk_size` = size), else 0:
    the layer's own rule (`moe.chunk_limit`), on an ASSUMED_DEVICE_GIB device."""
    pairs = tokens * active_per_token
    kept = pairs * pair_bytes(args, b) * args.n_layers
    return chunk_limit(size, pairs, tokens, args.routed_top_k, kept, ASSUMED_DEVICE_GIB * GiB)


def activation_bytes(
    args, job_config, active_per_token: float, ac_mode: str, pair_chunk_size=None, expert_parallel=False
) -> float:
    """Activations one micro-batch keeps for backward on one rank (balanced routing assumed), plus the
    largest transient of backward. Per token and layer: attention (~8 dim + 2 kv widths), router gates
    (fp32) and per active pair `pair_bytes`, or only its indices when the pairs run in chunks that are
    recomputed in backward (then one chunk's activations and gradients are the transient). Under expert
    parallelism the layer does not chunk; it recomputes the SwiGLU (a pair keeps its input and fp32
    output; one layer's SwiGLU is the transient). Plus the output logits in fp32 with their grad."""
    b = TORCH_DTYPE_MAP[job_config.training.mixed_precision_param].itemsize
    tokens = job_config.training.local_batch_size * job_config.training.seq_len
    kv = args.n_kv_heads * args.head_dim
    transient = 0.0
    if args.is_moe:
        size = job_config.moe.pair_chunk_size if pair_chunk_size is None else pair_chunk_size
        chunk = chunk_pairs(args, size, tokens, active_per_token, b)
        per_pair = 16 if chunk else pair_bytes(args, b)
        transient = 2 * chunk * pair_bytes(args, b)
        if chunk and expert_parallel:
            per_pair = pair_bytes(args, b) - 4 * args.expert_dim * b
            transient = 0 if ac_mode == "full" else tokens * active_per_token * 4 * args.expert_dim * b
        ffn = 2 * args.num_routed_experts * 4 + active_per_token * per_pair
    else:
        ffn = (2 * args.dim + 3 * args.dense_ffn_dim) * b
    per_layer = tokens * ((8 * args.dim + 2 * kv) * b + ffn)
    logits = tokens * args.vocab_size * (b + 4 + 4)
    if ac_mode == "full":  # block inputs kept, one block recomputed at a time
        return args.n_layers * tokens * args.dim * b + per_layer + logits + transient
    return args.n_layers * per_layer + logits + transient


def dry_run(argv: list[str]) -> str:
    world_size, argv = _take_world_size(argv)
    os.environ["NGPU"] = str(world_size)  # torchtitan's fake backend takes the world size from NGPU
    # Dataset paths belong to the training machine, not to the one validating its layout.
    job_config = load_config([*argv, "--comm.mode", "fake_backend"], check_data=False, world_size=world_size)
    layout = resolve_layout(job_config.parallelism, world_size)  # checked by load_config
    enable_cpu_training()
    dist_utils.init_distributed(job_config.comm)
    p = job_config.parallelism
    parallel_dims = ParallelDims(
        dp_shard=p.data_parallel_shard_degree, dp_replicate=p.data_parallel_replicate_degree,
        cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree, etp=p.expert_tensor_parallel_degree, world_size=world_size,
    )
    parallel_dims.build_mesh()

    spec = get_train_spec(job_config.model.name)
    args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    notes = ["dataset paths not checked (they name files on the training machine)"]
    try:
        args.update_from_config(job_config)
    except Exception as e:  # e.g. the GPT-2 tokenizer needs a download; the flavor fixes the vocabulary
        if args.vocab_size is None:
            raise
        args.update_from_config(job_config, tokenizer_vocab_size=args.vocab_size)
        notes.append(f"tokenizer not loaded ({type(e).__name__}); vocabulary from the flavor: {args.vocab_size}")
    with torch.device("meta"), set_default_dtype(TORCH_DTYPE_MAP[job_config.training.dtype]):
        model = spec.model_cls(args)
    model = spec.parallelize_fn(model, parallel_dims, job_config)

    params = count_rank_params(model, layout.efsdp)
    return report(job_config, layout, parallel_dims, args, params, notes)


def report(job_config, layout, parallel_dims, args, params: RankParams, notes: list[str]) -> str:
    t = job_config.training
    master = TORCH_DTYPE_MAP[t.dtype].itemsize
    compute = TORCH_DTYPE_MAP[t.mixed_precision_param].itemsize
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * layout.data_parallel
    accum = global_batch // (t.local_batch_size * layout.data_parallel)
    counts = args.param_counts()
    meshes = {  # torchtitan also builds (fake-backed) meshes it does not use
        k: m.size() for k, m in parallel_dims.get_all_one_dimensional_meshes().items()
        if parallel_dims.get_optional_mesh(k) is not None
    }
    states = params.total * (master + master + 8)  # weights + grads + AdamW exp_avg, exp_avg_sq (fp32)
    # FSDP all-gathers one block (+ the next, prefetched) in the compute dtype, and reduce-scatters its grads.
    gathered = 3 * (params.dense_unsharded_block + params.experts_unsharded_block) * compute
    ac = job_config.activation_checkpoint.mode
    lines = [
        f"dry run: {job_config.model.flavor} ({job_config.moe.router} router, "
        f"{args.num_routed_experts if args.is_moe else 0} experts/layer) on {layout.describe()}",
        f"meshes (size > 1): " + (", ".join(f"{k}={v}" for k, v in meshes.items()) or "none"),
        f"batch: global {global_batch} = local {t.local_batch_size} x {layout.data_parallel} data-parallel ranks "
        f"x {accum} micro-batches; seq_len {t.seq_len}",
        f"model: {counts.total:,} parameters, {args.active_params():,.0f} active per token",
        f"per rank (rank 0): {params.total:,} parameters = {params.dense:,} dense (1/{layout.dp_shard}"
        f"{' per replica' if layout.dp_replicate > 1 else ''})"
        + (f" + {params.experts:,} experts (1/{layout.ep * layout.efsdp} of {counts.ffn_total:,})"
           if args.is_moe else ""),
        f"memory estimate per rank: {states / GiB:.2f} GiB weights+grads+AdamW ({t.dtype}), "
        f"{gathered / GiB:.2f} GiB FSDP gathered blocks ({t.mixed_precision_param})",
    ]
    fixed = states + gathered
    ep = layout.ep > 1
    act = activation_bytes(args, job_config, args.routed_top_k, ac, expert_parallel=ep)
    router = get_router(job_config.moe.router)
    stage = "stage III, " if router.start_experts_per_token is not None else ""
    text = f"  activations per micro-batch (AC {ac}): {act / GiB:.2f} GiB"
    if args.is_moe:
        text += f" ({stage}{args.routed_top_k} active experts/token)"
    lines.append(text)
    lines.append(
        f"  peak estimate{' in stage III' if stage else ''}: {(fixed + act) / GiB:.2f} GiB (balanced routing; "
        "excludes allocator slack, communication buffers and the CUDA context)"
    )
    if router.start_experts_per_token is not None:  # e.g. ReMoE's dense stage I: the peak is early
        dense = router.start_experts_per_token(args)
        act_dense = activation_bytes(args, job_config, dense, ac, expert_parallel=ep)
        unbounded = activation_bytes(args, job_config, dense, ac, pair_chunk_size=0)
        tokens = t.local_batch_size * t.seq_len
        b = TORCH_DTYPE_MAP[t.mixed_precision_param].itemsize
        chunk = chunk_pairs(args, job_config.moe.pair_chunk_size, tokens, dense, b)
        setting = f"moe.pair_chunk_size = {job_config.moe.pair_chunk_size}" + (
            f", auto for an {ASSUMED_DEVICE_GIB} GiB device" if job_config.moe.pair_chunk_size == -1 else "")
        how = f"pairs in chunks of {chunk:,} ({setting})" if chunk else f"pairs not chunked ({setting})"
        if chunk and ep:
            how = f"experts' SwiGLU recomputed in backward ({setting}; expert parallelism does not chunk)"
        lines.append(
            f"  peak estimate in stage I (dense start, ~{dense:g} experts/token): {(fixed + act_dense) / GiB:.2f} GiB, "
            f"{how}" + (f"; {(fixed + unbounded) / GiB:.2f} GiB with moe.pair_chunk_size = 0" if chunk else "")
        )
    lines += [f"note: {n}" for n in notes]
    lines.append("dry run OK: the layout validates")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    init_logger()
    try:
        text = dry_run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, FileNotFoundError) as e:
        for line in (e.lines() if isinstance(e, ConfigError) else [f"config error: {e}"]):
            logger.error(line)
        raise SystemExit(2) from None
    print(text, flush=True)


if __name__ == "__main__":
    main()
