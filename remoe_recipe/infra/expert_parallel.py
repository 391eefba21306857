"""Expert parallelism with one host sync per MoE layer for ReLU routing too.

torchtitan's `ExpertParallel` reads the exchange's split sizes on the host (its one sync) and needs the
routed rows to be exactly the pairs. ReLU routing does not know its number of pairs P without a second
read, so under expert parallelism the MoE layer hands the experts a static-size buffer of T * E rows
(every pair a token could have, dropless by construction) whose first P rows are the pairs, and this style
trims the buffer to the split sizes' total once they are on the host: one sync for both. The exchange back
returns the P real rows; the layer reads P from their shape. Everything else is torchtitan's, unchanged.
"""

import torchtitan.distributed.expert_parallel as tt_expert_parallel
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.distributed.expert_parallel import ExpertParallel


class TrimmingExpertParallel(ExpertParallel):
    def _token_dispatch(self, mod: nn.Module, inputs: tuple, device_mesh: DeviceMesh):
        exchange = tt_expert_parallel.all_to_all_single_autograd

        def trimmed(routed_input, output_splits, input_splits, group):
            # rows past the routed pairs are the static bound's padding: they are not sent
            return exchange(routed_input[: sum(input_splits)], output_splits, input_splits, group)

        tt_expert_parallel.all_to_all_single_autograd = trimmed
        try:
            return super()._token_dispatch(mod, inputs, device_mesh)
        finally:
            tt_expert_parallel.all_to_all_single_autograd = exchange

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.exchange_trims_rows = True  # the MoE layer may pass a static-size buffer
        return super()._apply(module, device_mesh)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """torchtitan's `apply_moe_ep_tp` without tensor parallelism, with the trimming style."""
    from torch.distributed.tensor.parallel import parallelize_module

    for block in model.layers.values():
        if block.moe_enabled:
            parallelize_module(block.moe.experts, ep_mesh, TrimmingExpertParallel())
