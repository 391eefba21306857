"""CPU/gloo compatibility for torchtitan 0.2.2, in one place (notes: torchtitan-0.2.2.md, six blockers).

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


def force_sum_reduction_for_gloo(model: torch.nn.Module) -> None:
    """Blocker 6: with gradient division disabled FSDP2 reduces with PREMUL_SUM, which gloo lacks.
    Call after fully_shard; a no-op with an accelerator."""
    if has_accelerator():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
