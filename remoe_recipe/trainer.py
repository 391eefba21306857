"""The recipe's Trainer: torchtitan 0.2.2's Trainer, subclassed for ReMoE (the entry point is train.py).

What the subclass adds to torchtitan's loop:
- the router's objective (remoe_recipe/routers): its auxiliary loss on top of the LM loss (ReMoE's λ · L1,
  TopK's load-balancing loss, or none), its per-step update (ReMoE's λ ×α or ÷α, from the sparsity reduced
  over layers, micro-batches and data-parallel ranks in one all-reduce), its metrics and checkpointed state;
- MFU from active FLOPs at the measured sparsity;
- routing metrics for TensorBoard (`moe/*`, `moe_layers/*`, the router's own, the expert-load image);
- a finiteness check of the loss, gradient norm and router statistics every step, before the optimizer
  step and before the step can be saved (`finiteness.py`);
- SIGTERM / SIGUSR1 (preemption, SLURM's `--signal`): the current step finishes, a checkpoint of it is
  saved and the process exits 0;
- the recipe's checks around torchtitan's checkpoint loading (infra/checkpoint_layout.py).
"""

import contextlib
import logging
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
import torchtitan.distributed.utils as titan_dist_utils
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from remoe_recipe import named_tensors
from remoe_recipe.config import ConfigError
from remoe_recipe.finiteness import NonFiniteError, describe_non_finite, first_non_finite_state, step_values
from remoe_recipe.infra.checkpoint_layout import (
    CheckpointError, check_resume, checkpoint_to_resume, first_line, other_steps_hint,
)
from remoe_recipe.metrics import RoutingMonitor, append_expert_load, load_image, tensorboard_writer
from remoe_recipe.optim import warmup_steps
from remoe_recipe.platform import enable_cpu_training, has_accelerator
from remoe_recipe.router_loss import RouterLossWrapper
from remoe_recipe.routers import get_router
from remoe_recipe.routing_health import RoutingHealth
from remoe_recipe.routing_stats import ReducedRoutingStats, StepRoutingStats
from remoe_recipe.run_log import Progress, agreed_tensorboard_name, tensorboard_folder_named


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class WarmupInTrainerSummary(logging.Filter):
    """torchtitan's "Trainer is initialized with ... (warmup N)" line prints lr_scheduler.warmup_steps; with
    lr_scheduler.warmup_fraction that is the unused default (200): print the warmup the schedule uses."""

    def __init__(self, configured: int, used: int):
        super().__init__()
        self.configured, self.used = configured, used

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Trainer is initialized with"):
            record.msg = record.msg.replace(f"(warmup {self.configured})", f"(warmup {self.used})")
        return True


class ReMoETrainer(Trainer):
    def __init__(self, job_config):
        enable_cpu_training()  # no-op where an accelerator is present
        self.signal_received: int | None = None  # set by the handler on this rank
        self.stop_signal: int | None = None  # agreed by all ranks at a step's check; acted on after the step
        self.interrupted = False
        self._micro_losses: list[torch.Tensor] = []
        self._grad_norm: torch.Tensor | None = None
        self._tensorboard_folder = contextlib.ExitStack()
        summary = WarmupInTrainerSummary(
            job_config.lr_scheduler.warmup_steps, warmup_steps(job_config.lr_scheduler, job_config.training.steps)
        )
        logger.addFilter(summary)
        try:
            super().__init__(job_config)  # init_distributed (below) names this run's TensorBoard folder
        finally:
            self._tensorboard_folder.close()
            logger.removeFilter(summary)
        self.progress = Progress(job_config.training.steps)
        if not has_accelerator():
            # torchtitan divides by an A100's peak on CPU; use the stated CPU peak, or report no MFU.
            peak = job_config.metrics.cpu_peak_flops
            self.metrics_processor.gpu_peak_flops = peak if peak > 0 else float("nan")
            logger.info(
                f"MFU on CPU: against metrics.cpu_peak_flops = {peak:.3e}" if peak > 0
                else "MFU on CPU: not reported (nan); set metrics.cpu_peak_flops to the CPU's peak FLOP/s"
            )
        args = self.model_args
        seq_len = job_config.training.seq_len
        logger.info(
            f"ReMoE model: {args.param_counts().total:,} parameters in total, "
            f"{args.active_params():,.0f} active per token and "
            f"{args.flops_per_token(seq_len):,.0f} training FLOPs per token at "
            f"{args.routed_top_k if args.is_moe else 0} experts per token (ReMoE: MFU follows the measured sparsity)"
        )
        self.routing_stats: StepRoutingStats | None = None
        self.last_routing: ReducedRoutingStats | None = None
        self.pending_routing_log = None
        self._titan_load, self.checkpointer.load = self.checkpointer.load, self._load_checkpoint
        self.optimizers.register_step_pre_hook(lambda *a, **k: self._before_optimizer_step())
        # What the router adds to training (remoe_recipe/routers): ReMoE's adaptive λ · L1, TopK's
        # aux loss, or nothing; its metrics and its checkpointed state.
        self.router_objective = get_router(args.moe.router).objective(args, self.device)
        if not args.is_moe:
            return
        self.routing_stats = StepRoutingStats(args.n_layers, args.num_routed_experts, self.device)
        self.routing_health = RoutingHealth(
            args.n_layers, args.num_routed_experts, job_config.metrics.routing_alert_steps,
            job_config.metrics.dead_expert_share, self.device,
        )
        self.routing_monitor = RoutingMonitor(
            args.n_layers, args.num_routed_experts, self.router_objective, self.device
        )
        # The validator was built with the plain LM loss; only training adds the router term.
        self.loss_fn = RouterLossWrapper(self.loss_fn, self.model_parts, self.router_objective, self.routing_stats)

    def init_distributed(self):
        parallel_dims = super().init_distributed()
        name = agreed_tensorboard_name(self.job_config)
        self._tensorboard_folder.enter_context(tensorboard_folder_named(name))
        return parallel_dims

    def _routing_group(self):
        if not self.parallel_dims.dp_cp_enabled:
            return None
        return self.parallel_dims.get_mesh("loss").get_group()

    def _before_optimizer_step(self) -> None:
        """Runs once per step, after every micro-batch's backward and the gradient clipping (an
        optimizer step pre-hook): the step's values are checked before the weights change."""
        if self.routing_stats is not None:
            self.last_routing = self.routing_stats.reduce(self._routing_group())
        self._check_step()
        if self.routing_stats is not None:
            self._observe_routing()

    def _check_step(self) -> None:
        """One host transfer per step: finiteness of the step's values, and whether any rank was
        asked to stop (one tiny all-reduce when there are several ranks, so all stop at the same step)."""
        routing = self.last_routing if self.routing_stats is not None else None
        local_loss = torch.stack(self._micro_losses).sum() if self._micro_losses else torch.zeros((), device=self.device)
        # The all-reduced LM loss where routing statistics exist; else this rank's part of the loss.
        loss = routing.lm_loss if routing is not None else local_loss
        grad_norm = self._grad_norm if self._grad_norm is not None else torch.zeros((), device=self.device)
        values = step_values(
            loss, grad_norm,
            routing.layer_loss_term if routing is not None else None,
            routing.layer_sparsity if routing is not None else None,
        )
        flags = torch.stack([
            (~torch.isfinite(local_loss)).float().to(values.device),
            torch.tensor(float(self.signal_received or 0), device=values.device),
        ])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        health = self.routing_health.update(routing) if routing is not None else values[:0]
        host = named_tensors.to_host({"values": values, "health": health, "flags": flags})  # the one transfer
        values, health_host, (loss_bad_somewhere, stop) = host["values"], host["health"], host["flags"]
        if loss_bad_somewhere and values[0] == values[0]:
            values[0] = float("nan")  # another rank's loss
        num_layers = len(routing.layer_loss_term) if routing is not None else 0
        reason = describe_non_finite(self.step, values, num_layers, self.model_parts)
        if reason is not None:
            raise NonFiniteError(reason)
        if routing is not None:
            for warning in self.routing_health.check(self.step, health_host):
                logger.warning(warning)
        if stop:
            self.stop_signal = int(stop)  # the same decision on every rank, whichever received the signal

    def _observe_routing(self) -> None:
        """One small all-reduce on the device every step (done above); a host transfer only at logged steps."""
        self.routing_monitor.observe(self.last_routing)
        self.router_objective.after_step(self.step, self.last_routing)  # e.g. λ ×α or ÷α
        if self.metrics_processor.should_log(self.step):
            self.pending_routing_log = self.routing_monitor.collect(self.last_routing)
            # MFU from the FLOPs this step actually ran (ReMoE: measured, not k/E).
            active = self.pending_routing_log[0]["moe/active_experts_per_token"]
            self.metrics_processor.num_flops_per_token = int(
                self.model_args.flops_per_token(self.job_config.training.seq_len, active)
            )

    def forward_backward_step(self, *args, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(*args, **kwargs)
        self._micro_losses.append(loss.detach())
        return loss

    @contextlib.contextmanager
    def _recording_grad_norm(self):
        """torchtitan's train_step keeps the gradient norm in a local variable; record it for the
        check in the optimizer pre-hook (the only way in without copying train_step)."""
        clip = titan_dist_utils.clip_grad_norm_

        def clip_and_record(*args, **kwargs):
            self._grad_norm = clip(*args, **kwargs)
            return self._grad_norm

        titan_dist_utils.clip_grad_norm_ = clip_and_record
        try:
            yield
        finally:
            titan_dist_utils.clip_grad_norm_ = clip

    def train_step(self, data_iterator) -> None:
        if self.routing_stats is not None:
            self.routing_stats.reset()
        self._micro_losses, self._grad_norm = [], None
        with self._recording_grad_norm():
            super().train_step(data_iterator)
        if self.metrics_processor.should_log(self.step):
            progress = self.progress(self.step)
            if self.pending_routing_log is not None:
                self._log_routing(*self.pending_routing_log, progress=progress)
                self.pending_routing_log = None
            else:
                logger.info(progress)

    def _log_routing(self, scalars: dict[str, float], relative_load: list[float], progress: str) -> None:
        scalars.update(self.routing_health.scalars())
        self.metrics_processor.logger.log(scalars, self.step)
        args = self.model_args
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank holds the same reduced loads
            append_expert_load(self.job_config.job.dump_folder, self.step, relative_load, args.n_layers,
                               args.num_routed_experts)
        writer = tensorboard_writer(self.metrics_processor.logger)
        # The heat map takes ~0.2 s to draw: at the first and last step and every 10th logged step.
        every = 10 * self.job_config.metrics.log_freq
        if writer is not None and (self.step in (1, self.job_config.training.steps) or self.step % every == 0):
            image = load_image(relative_load, args.n_layers, args.num_routed_experts)
            writer.add_image("moe/expert_load", image, self.step, dataformats="HWC")
        shown = [k for k in scalars if not k.startswith("moe_layers/")]
        logger.info(f"{progress}  " + "  ".join(f"{k}: {scalars[k]:.4g}" for k in shown))

    def should_continue_training(self) -> bool:
        """Called before each step, after the previous step's save and validation."""
        if self.stop_signal is not None and self.step > 0 and not self.interrupted:
            self.interrupted = True
            self._save_interrupted_step()
            return False
        more = super().should_continue_training()
        if not more and self.step > 0 and self.job_config.validation.enable:
            if not self.validator.should_validate(self.step):  # else torchtitan validated this step
                logger.info(f"Final validation at step {self.step}")
                self.validator.validate(self.model_parts, self.step)
        return more

    def _save_interrupted_step(self) -> None:
        name = signal.Signals(self.stop_signal).name
        ckpt = self.checkpointer
        if not ckpt.enable:
            logger.warning(f"{name} received: stopping after step {self.step}; checkpoint.enable is off, nothing saved")
            return
        if not ckpt._should_save(self.step, last_step=self.step == self.job_config.training.steps):
            interval, ckpt.interval = ckpt.interval, 1  # a full (resumable) save at this step
            try:
                ckpt.save(self.step)
            finally:
                ckpt.interval = interval
        ckpt._async_wait()
        logger.info(
            f"{name} received: stopped after step {self.step} of {self.job_config.training.steps}, "
            f"checkpoint {os.path.join(ckpt.folder, f'step-{self.step}')} saved; run the same command to resume"
        )

    def run_identity(self) -> dict[str, Any]:
        """What a checkpoint must have been saved by to resume this run (checked before loading)."""
        args = self.model_args
        return {
            "router": args.moe.router,
            "num_experts": args.num_routed_experts if args.is_moe else 0,
            "granularity": args.moe.granularity if args.is_moe else 1,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.run_identity())
        state.update(self.router_objective.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.router_objective.load_state_dict(state_dict)

    def _warn_changed_lr(self) -> None:
        """torchtitan restores the optimizer's and the schedule's state, so a changed optimizer.lr has no effect."""
        wanted = self.job_config.optimizer.lr
        saved = {
            group.get("initial_lr", group["lr"])
            for opt in self.optimizers.optimizers for group in opt.param_groups
        }
        if any(abs(lr - wanted) > 1e-12 * max(abs(wanted), 1e-30) for lr in saved):
            logger.warning(
                f"optimizer.lr = {wanted:g} differs from the checkpoint's {sorted(saved)[0]:g}; the checkpoint's "
                "learning-rate schedule is restored and continues (torchtitan loads optimizer and lr_scheduler state)"
            )

    def _load_checkpoint(self, step: int = -1) -> bool:
        """torchtitan's CheckpointManager.load, with the recipe's checks before and after it: every
        failure is one line naming the step folder and the option that helps."""
        cfg = self.job_config.checkpoint
        path = checkpoint_to_resume(cfg, self.job_config.job.dump_folder)
        if path is not None:
            dp = self.parallel_dims.get_mesh("batch").size() if self.parallel_dims.dp_enabled else 1
            from_initial = not os.path.exists(os.path.join(self.job_config.job.dump_folder, cfg.folder))
            model_only = cfg.initial_load_model_only if from_initial else step == 0
            check_resume(path, self.run_identity(), dp, list(cfg.exclude_from_loading), model_only)
        try:
            loaded = self._titan_load(step=step)
        except (CheckpointError, ConfigError):
            raise
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            where = path or os.path.join(self.job_config.job.dump_folder, cfg.folder)
            raise CheckpointError(
                f"checkpoint {where} could not be loaded ({type(e).__name__}: {first_line(e)}); "
                f"it may be corrupt: {other_steps_hint(where)}"
            ) from None
        if loaded:
            self._warn_changed_lr()
            bad = first_non_finite_state(
                {name: self.checkpointer.states[name].state_dict() for name in ("model", "optimizer")}
            )
            if bad is not None:
                raise CheckpointError(
                    f"checkpoint {path}: {bad} holds NaN/inf values after loading (a corrupt file, or saved from "
                    f"a diverged run); {other_steps_hint(path)}"
                )
        return loaded
