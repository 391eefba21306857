"""CPU/gloo compatibility for torchtitan 0.2.2, in one place (six places where 0.2.2 assumes an accelerator).

torchtitan 0.2.2 assumes an accelerator. On a machine without one, `enable_cpu_training()` patches the
few places that break; where CUDA (or another accelerator) is present it does nothing, so GPU runs use
torchtitan unmodified. The MoE's own code needs no patch: it picks the CPU permutation kernel by the
tensor's device, and never calls `torch.histc` on integers (blocker 4).
"""

import functools
import os
import resource
from datetime import timedelta

import torch
from torch._utils import _get_available_device_type

_applied = False


def has_accelerator() -> bool:
    return _get_available_device_type() is not None


def enable_cpu_training() -> bool:
    """Apply the CPU patches if there is no accelerator. Returns True if they are active."""
    global _applied
    if has_accelerator():
        return False
    if _applied:
        return True
    _use_cpu_device()
    _use_cpu_memory_monitor()
    _barrier_without_device_ids()
    _cpu_permute_kernel()
    _compilable_fp32_grouped_mm()
    _applied = True
    return True


def _use_cpu_device() -> None:
    """Blocker 1: tools.utils falls back to 'cuda'; modules bound the value at import."""
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.profiling as profiling
    import torchtitan.tools.utils as tools_utils

    tools_utils.device_type, tools_utils.device_module = "cpu", torch.cpu
    for module in (metrics, parallel_dims, dist_utils):
        module.device_type = "cpu"
    for module in (metrics, dist_utils, profiling):
        module.device_module = torch.cpu


class CPUMemoryMonitor:
    """Blocker 2: torchtitan's DeviceMemoryMonitor needs torch.cuda-style memory stats.
    On CPU, peak memory is the process's peak resident set (VmHWM), reset through clear_refs."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device("cpu")
        self.device_name = "cpu"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30

    @staticmethod
    def _peak_rss_bytes() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        peak = self._peak_rss_bytes()
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux)
        except OSError:
            pass


def _use_cpu_memory_monitor() -> None:
    import torchtitan.components.metrics as metrics

    metrics.DeviceMemoryMonitor = CPUMemoryMonitor


def _barrier_without_device_ids() -> None:
    """Blocker 3: set_pg_timeouts calls barrier(device_ids=[...]), which gloo rejects."""
    import torchtitan.distributed.utils as dist_utils

    def set_pg_timeouts(timeout: timedelta, parallel_dims) -> None:
        torch.distributed.barrier()
        groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
        for group in groups + [None]:
            torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)

    dist_utils.set_pg_timeouts = set_pg_timeouts  # torchtitan.train calls it through this module


def _cpu_permute_kernel() -> None:
    """Blocker 5: expert-parallel dispatch pads groups with a Triton kernel; use its CPU twin."""
    import torchtitan.models.moe.utils as moe_utils

    original = moe_utils.generate_permute_indices
    if not isinstance(original, functools.partial):
        moe_utils.generate_permute_indices = functools.partial(original, use_cpu=True)


def _compilable_fp32_grouped_mm() -> None:
    """torch.compile of the experts' `torch._grouped_mm` in fp32 (CPU runs train in fp32): the CPU
    kernel computes fp32, but the fake-tensor (meta) kernel that compile traces with copies CUDA's
    bf16-only check and rejects it. Give fp32/fp16 the output the meta kernel builds after its checks
    (torch 2.13's private `_create_grouped_mm_output_tensor`: contiguous on a CPU build)."""
    from torch._C import DispatchKey
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    op = torch.ops.aten._grouped_mm.default
    checked = op.py_kernels[DispatchKey.Meta]
    if getattr(checked, "_remoe_fp32", False):
        return

    def meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        if mat_a.dtype == mat_b.dtype and mat_a.dtype in (torch.float32, torch.float16) and bias is None:
            return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)
        return checked(mat_a, mat_b, offs, bias, out_dtype)

    meta._remoe_fp32 = True
    op.py_kernels[DispatchKey.Meta] = meta
    op._dispatch_cache.clear()


def force_sum_reduction_for_gloo(model: torch.nn.Module) -> None:
    """Blocker 6: with gradient division disabled FSDP2 reduces with PREMUL_SUM, which gloo lacks.
    Call after fully_shard; a no-op with an accelerator."""
    if has_accelerator():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def init_like_one_process(model: torch.nn.Module, build_unsharded) -> None:
    """Make a sharded model start from the weights a one-process run with the same seed starts from.

    On an accelerator DTensor's offset-based RNG draws each shard from the unsharded stream. The CPU
    generator has no such tracker, so every rank would draw its shard from the start of the stream:
    the initial weights, and with them the whole run, would depend on the layout. On CPU the model's
    `init_weights` is therefore replaced: it initialises an unsharded copy (`build_unsharded()`, on
    meta) exactly as one process would, consuming the same random numbers, and copies each rank's
    shard out of it. Costs one unsharded model per rank at start-up; a no-op with an accelerator or
    without DTensor parameters.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from remoe_recipe.infra.checkpoint_layout import checkpoint_fqn

    if has_accelerator() or not any(isinstance(p, DTensor) for p in model.parameters()):
        return
    init_sharded = model.init_weights

    def init_weights(buffer_device=None) -> None:
        rng = torch.get_rng_state()
        init_sharded(buffer_device=buffer_device)  # buffers (non-random) and the shard layout
        torch.set_rng_state(rng)  # draw exactly what one process draws
        dtype = next(model.parameters()).dtype
        with torch.device("meta"):
            reference = build_unsharded()
        reference.to_empty(device="cpu").to(dtype)
        reference.init_weights()
        full = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            value = full[checkpoint_fqn(name)]
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(value.to_local())
            else:
                param.copy_(value)

    model.init_weights = init_weights

