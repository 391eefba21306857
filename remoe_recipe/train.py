"""Training entry point: torchtitan 0.2.2's Trainer, subclassed for ReMoE.

    torchrun --nproc_per_node N -m remoe_recipe.train --job.config_file train_configs/<run>.toml [--section.key value ...]
    python -m remoe_recipe.train --job.config_file ...          # one process, no torchrun

What the subclass adds to torchtitan's loop:
- the router's auxiliary loss (ReMoE's lambda * L1, or TopK's load-balancing loss) on top of the LM loss;
- the adaptive L1 controller: after every step's backward passes, sparsity is reduced over layers,
  micro-batches and data-parallel ranks in one all-reduce, and lambda is multiplied or divided by alpha;
- lambda in the checkpoint's train_state; MFU from active FLOPs at the measured sparsity;
- routing metrics for TensorBoard (`remoe/*`, `moe/*`, `moe_layers/*`, the expert-load image).
"""

import os
import socket
import sys
from typing import Any

import torch
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer

import remoe_recipe  # noqa: F401  registers the `remoe` train spec
from remoe_recipe.config import ConfigError
from remoe_recipe.load_checkpoint import RUN_CONFIG_FILE
from remoe_recipe.metrics import RoutingMonitor, tensorboard_writer
from remoe_recipe.platform import enable_cpu_training
from remoe_recipe.preflight import load_config
from remoe_recipe.router_loss import RouterLossWrapper
from remoe_recipe.routing_stats import ReducedRoutingStats, StepRoutingStats
from remoe_recipe.sparsity import L1CoefficientController


class ReMoETrainer(Trainer):
    def __init__(self, job_config):
        enable_cpu_training()  # no-op where an accelerator is present
        super().__init__(job_config)
        args = self.model_args
        seq_len = job_config.training.seq_len
        logger.info(
            f"ReMoE model: {args.param_counts().total:,} parameters in total, "
            f"{args.active_params():,.0f} active per token and "
            f"{args.flops_per_token(seq_len):,.0f} training FLOPs per token at "
            f"{args.routed_top_k if args.is_moe else 0} experts per token (ReMoE: MFU follows the measured sparsity)"
        )
        self.routing_stats: StepRoutingStats | None = None
        self.l1_controller: L1CoefficientController | None = None
        self.last_routing: ReducedRoutingStats | None = None
        self.pending_routing_log = None
        if not args.is_moe:
            return
        self.routing_stats = StepRoutingStats(args.n_layers, args.num_routed_experts, self.device)
        self.routing_monitor = RoutingMonitor(
            args.n_layers, args.num_routed_experts,
            args.target_sparsity if args.moe.router == "relu" else None, self.device,
        )
        if args.moe.router == "relu":
            self.l1_controller = L1CoefficientController(
                args.moe.l1_coeff_init, args.moe.l1_coeff_multiplier, args.target_sparsity, self.device
            )
            coeff = lambda: self.l1_controller.coeff  # noqa: E731
        else:
            coeff = lambda: args.moe.aux_loss_coeff  # noqa: E731
        # The validator was built with the plain LM loss; only training adds the router term.
        self.loss_fn = RouterLossWrapper(
            self.loss_fn, self.model_parts, coeff,
            average_layers=args.moe.router == "relu", stats=self.routing_stats,
        )
        self.optimizers.register_step_pre_hook(lambda *a, **k: self._after_backward())

    def _routing_group(self):
        if not self.parallel_dims.dp_cp_enabled:
            return None
        return self.parallel_dims.get_mesh("loss").get_group()

    def _after_backward(self) -> None:
        """Runs once per step, after every micro-batch's backward (an optimizer step pre-hook).
        One small all-reduce on the device every step; a host transfer only at logged steps."""
        self.last_routing = self.routing_stats.reduce(self._routing_group())
        coeff_used = self.l1_controller.coeff if self.l1_controller is not None else None
        self.routing_monitor.observe(self.step, self.last_routing, coeff_used)
        if self.l1_controller is not None:
            self.l1_controller.update(self.last_routing.sparsity)
        if self.metrics_processor.should_log(self.step):
            self.pending_routing_log = self.routing_monitor.collect(self.last_routing, coeff_used)
            # MFU from the FLOPs this step actually ran (ReMoE: measured, not k/E).
            active = self.pending_routing_log[0]["moe/active_experts_per_token"]
            self.metrics_processor.num_flops_per_token = int(
                self.model_args.flops_per_token(self.job_config.training.seq_len, active)
            )

    def train_step(self, data_iterator) -> None:
        if self.routing_stats is not None:
            self.routing_stats.reset()
        super().train_step(data_iterator)
        if self.pending_routing_log is not None:
            self._log_routing(*self.pending_routing_log)
            self.pending_routing_log = None

    def _log_routing(self, scalars: dict[str, float], load_image) -> None:
        self.metrics_processor.logger.log(scalars, self.step)
        writer = tensorboard_writer(self.metrics_processor.logger)
        if writer is not None:
            writer.add_image("moe/expert_load", load_image, self.step, dataformats="HWC")
        shown = [k for k in scalars if not k.startswith("moe_layers/") and k != "moe/sparsity"]
        logger.info(f"step: {self.step:2}  " + "  ".join(f"{k}: {scalars[k]:.4g}" for k in shown))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.l1_controller is not None:
            state.update(self.l1_controller.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.l1_controller is not None:
            if "l1_coeff" not in state_dict:
                raise ValueError("checkpoint train_state has no l1_coeff: it was not saved by a ReMoE (relu) run")
            self.l1_controller.load_state_dict(state_dict)


def _single_process_env() -> None:
    """`python -m remoe_recipe.train` without torchrun: a world of one on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


def main(argv: list[str] | None = None) -> None:
    init_logger()
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = load_config(argv)
    except (ConfigError, FileNotFoundError) as e:
        logger.error(f"config error: {e}")
        raise SystemExit(2) from None
    if config.job.save_config_file is None:
        # RUN/job_config.json: export, evaluate and generate read the model's shape from it.
        config.job.save_config_file = RUN_CONFIG_FILE
    _single_process_env()
    trainer: ReMoETrainer | None = None
    try:
        trainer = ReMoETrainer(config)
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise ConfigError("checkpoint.create_seed_checkpoint needs one process and checkpoint.enable")
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
