"""The optimizer's parameter groups, the warmup length, the router-loss scaling and lambda's timing,
each checked against a hand computation."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from remoe_recipe.config import ConfigError, MoEConfig
from remoe_recipe.model import ReMoEModelArgs, ReMoETransformer
from remoe_recipe.model.moe import RouterRecord
from remoe_recipe.optim import build_remoe_lr_schedulers, build_remoe_optimizers
from remoe_recipe.preflight import load_config
from remoe_recipe.router_loss import RouterLossWrapper
from remoe_recipe.routers import RouterObjective
from remoe_recipe.routing_stats import StepRoutingStats
from tests.runs import CONFIGS, run_training

LR, WD = 1e-2, 0.1


def _model(router="relu") -> nn.Module:
    torch.manual_seed(0)
    args = ReMoEModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                          moe=MoEConfig(router=router, num_experts=4))
    model = ReMoETransformer(args)
    model.init_weights()
    return model


def _optimizer_config(**extra):
    return SimpleNamespace(
        name="AdamW", lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=WD,
        implementation="for-loop", early_step_in_backward=False, **extra,
    )


def _parallel_dims():
    return SimpleNamespace(ep_enabled=False, pp_enabled=False)


def _step_with_zero_grads(model, optimizers):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizers.step()


def test_no_weight_decay_on_norms_by_default():
    """With zero gradients AdamW only decays: p <- p * (1 - lr * wd). RMSNorm weights (1-D) keep
    their value, as Megatron's no_weight_decay_cond; every matrix and the expert tensors shrink."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = build_remoe_optimizers([model], _optimizer_config(decay_1d_params=False), _parallel_dims())
    _step_with_zero_grads(model, optimizers)
    norm_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.RMSNorm)}
    assert len(norm_names) == 2 * 2 + 1
    for name, p in model.named_parameters():
        expected = before[name] if name in norm_names else before[name] * (1 - LR * WD)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_decay_1d_params_restores_decay_everything():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = build_remoe_optimizers([model], _optimizer_config(decay_1d_params=True), _parallel_dims())
    _step_with_zero_grads(model, optimizers)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (1 - LR * WD), rtol=0, atol=1e-7, msg=name)


def test_param_groups_are_saved_by_parameter_name():
    """The two groups go through torchtitan's flattened (name-keyed) optimizer state dict, so a
    checkpoint records each parameter's decay (exact resume: tests/test_train.py)."""
    model = _model()
    optimizers = build_remoe_optimizers([model], _optimizer_config(), _parallel_dims())
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizers.step()
    state = optimizers.state_dict()
    assert state["param_groups.norm.weight.weight_decay"] == 0.0
    assert state["param_groups.layers.1.ffn_norm.weight.weight_decay"] == 0.0
    assert state["param_groups.output.weight.weight_decay"] == WD
    assert state["param_groups.layers.0.moe.experts.w1.weight_decay"] == WD


@pytest.mark.parametrize("fraction, steps, expected", [(0.01, 60000, 600), (0.01, 20000, 200), (0.2, 300, 60)])
def test_warmup_fraction_sets_the_warmup(fraction, steps, expected):
    """Linear warmup over int(fraction * steps) steps (Megatron's --lr-warmup-fraction), then decay."""
    model = nn.Linear(2, 2)
    optimizers = build_remoe_optimizers([model], _optimizer_config(decay_1d_params=True), _parallel_dims())
    config = SimpleNamespace(
        warmup_steps=7, warmup_fraction=fraction, total_steps=None, decay_ratio=None,
        decay_type="cosine", min_lr_factor=0.1,
    )
    schedulers = build_remoe_lr_schedulers(optimizers, config, steps)
    lrs = []
    for _ in range(expected + 1):
        lrs.append(optimizers.optimizers[0].param_groups[0]["lr"])
        optimizers.step()
        schedulers.step()
    assert lrs[: expected] == pytest.approx([LR * (i + 1) / expected for i in range(expected)])
    assert lrs[expected] <= LR  # warmup is over: decay from the peak


def test_warmup_fraction_is_checked():
    paper = ["--job.config_file", str(CONFIGS / "paper_182M_remoe.toml")]
    assert load_config(paper, check_data=False).lr_scheduler.warmup_fraction == 0.01
    with pytest.raises(ConfigError, match="lr_scheduler.warmup_fraction = 1.5"):
        load_config([*paper, "--lr_scheduler.warmup_fraction", "1.5"], check_data=False)
    # debug_remoe.toml sets warmup_steps: a fraction as well is ambiguous, not silently preferred.
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(["--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--lr_scheduler.warmup_fraction", "0.1"])


class _Part:
    """A model part that reports prepared router records, as ReMoETransformer.pop_router_records does."""

    def __init__(self):
        self.records = []

    def pop_router_records(self):
        records, self.records = self.records, []
        return records


@pytest.mark.parametrize("average_layers", [True, False])
def test_router_loss_enters_as_tokens_times_coeff_times_term(average_layers):
    """Over two micro-batches of different sizes, after torchtitan's division by the global token
    count, the gradient is coeff * sum_mb T_mb * term_mb / N (layers averaged for ReMoE, summed for
    TopK) and the returned value is the language-model loss alone."""
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    part = _Part()
    coeff = 0.3

    class Objective(RouterObjective):  # ReMoE's reduction (mean over layers) or TopK's (sum)
        def loss_coeff(self):
            return coeff

        def reduce_layers(self, terms):
            return terms.mean() if average_layers else terms.sum()

    wrapper = RouterLossWrapper(
        lambda pred, labels: (pred - labels.float()).pow(2).sum(), [part], Objective(),
        stats=StepRoutingStats(2, 3, torch.device("cpu")),
    )
    total_tokens, values, expected_grad = 0, [], torch.zeros(3)
    for num_tokens, scale in ((5, 1.0), (11, 3.0)):
        terms = [scale * w.pow(2).sum(), scale * w.sum()]  # two layers
        part.records = [RouterRecord(t, torch.ones(3), num_tokens) for t in terms]
        pred, labels = torch.zeros(num_tokens), torch.ones(num_tokens, dtype=torch.long)
        values.append(wrapper(pred, labels))
        layer_grads = [scale * 2 * w.detach(), scale * torch.ones(3)]
        combined = sum(layer_grads) / (2 if average_layers else 1)
        expected_grad += coeff * num_tokens * combined
        total_tokens += num_tokens
    (sum(values) / total_tokens).backward()
    torch.testing.assert_close(w.grad, expected_grad / total_tokens)
    assert [v.item() for v in values] == [5.0, 11.0]  # sum of (0 - 1)^2: the LM loss only


def test_each_step_uses_its_own_lambda(tmp_path, monkeypatch):
    """lambda_i is what step i's loss is scaled by; the controller's update after step i's backward
    takes effect at step i + 1 (official code: the update follows train_step). Observed in the real
    trainer by recording the coefficient each loss call reads."""
    from remoe_recipe import train as train_module

    monkeypatch.delenv("RANK", raising=False)
    for key in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    config = load_config([
        "--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--job.dump_folder", str(tmp_path),
        "--training.steps", "4", "--training.seq_len", "32", "--training.local_batch_size", "2",
        "--training.global_batch_size", "4", "--checkpoint.no-enable", "--validation.no-enable",
        "--metrics.no-enable_tensorboard", "--moe.l1_coeff_init", "0.5", "--moe.l1_coeff_multiplier", "1.2",
    ])
    train_module._single_process_env()
    trainer = train_module.ReMoETrainer(config)
    try:
        used, sparsities = [], []
        objective = trainer.router_objective
        read = objective.loss_coeff
        objective.loss_coeff = lambda: used.append(float(read())) or read()
        original_observe = trainer.routing_monitor.observe

        def observe(stats):
            sparsities.append(float(stats.sparsity))
            return original_observe(stats)

        trainer.routing_monitor.observe = observe
        trainer.train()
    finally:
        trainer.close()
        torch.distributed.destroy_process_group()
    # Two micro-batches per step (global 4 = 2 x local 2): both read the same lambda.
    assert len(used) == 8 and len(sparsities) == 4
    lam, target = 0.5, 1 - 1 / 8
    for step in range(4):
        assert used[2 * step] == used[2 * step + 1] == pytest.approx(lam, rel=1e-6), step
        lam = lam * 1.2 if sparsities[step] < target else lam / 1.2
    assert math.isfinite(lam)


def test_trainer_summary_line_shows_the_warmup_the_schedule_uses(tmp_path):
    """small_remoe.toml sets warmup_fraction = 0.1: torchtitan's summary line must not print the unused
    warmup_steps default (200) next to the recipe's own line."""
    proc = run_training("small_remoe.toml", tmp_path, "--training.steps", "20")
    log = proc.stdout + proc.stderr
    assert "Learning-rate warmup: 2 steps (lr_scheduler.warmup_fraction = 0.1)" in log
    summary = next(line for line in log.splitlines() if "Trainer is initialized with" in line)
    assert summary.endswith("total steps 20 (warmup 2)"), summary
