"""A router defined only here, registered here, trains through the real trainer: nothing else in the recipe
needs to know its name (the registry is the only place a router name is looked up)."""

import pytest
import torch
from torch import nn

from remoe_recipe import train as train_module
from remoe_recipe.analysis.runs import read_run
from remoe_recipe.routers import Router, RouterObjective, RouterSpec, Routing, register_router, unregister_router
from tests.runs import CONFIGS

NAME = "sigmoid_test"


class SigmoidRouter(Router):
    """gates = sigmoid(x W) where above 1/2, else 0: a variable number of experts per token (like ReLU),
    so the MoE layer reads the pair count from the mask."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__(num_experts, top_k)
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def num_pairs(self, num_tokens: int) -> None:
        return None

    def forward(self, x, token_ids=None) -> Routing:
        probs = torch.sigmoid(self.gate(x).float())
        mask = probs > 0.5
        gates = probs * mask
        return Routing(gates=gates, mask=mask, loss_term=probs.mean())


class CountingObjective(RouterObjective):
    """A constant coefficient on the mean over layers, a step counter in the checkpoint, two metrics."""

    def __init__(self, args, device):
        super().__init__(args, device)
        self.steps = torch.zeros((), device=device)

    def loss_coeff(self) -> float:
        return 0.01

    def reduce_layers(self, layer_terms):
        return layer_terms.mean()

    def after_step(self, step, stats) -> None:
        self.steps = self.steps + 1

    def log_tensors(self, stats):
        return {f"{NAME}/steps_seen": self.steps, f"{NAME}/loss_term": stats.loss_term}

    def state_dict(self):
        return {f"{NAME}_steps": int(self.steps.item())}

    def load_state_dict(self, state):
        self.steps = torch.tensor(float(state[f"{NAME}_steps"]), device=self.device)


@pytest.fixture
def registered():
    spec = register_router(RouterSpec(
        name=NAME,
        summary="test: sigmoid gates above 1/2",
        build=lambda args, layer_id: SigmoidRouter(args.dim, args.num_routed_experts, args.routed_top_k),
        objective=CountingObjective,
        variable_pairs=True,
    ))
    yield spec
    unregister_router(NAME)


def test_a_router_registered_in_a_test_trains_through_the_trainer(tmp_path, registered, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    dump = tmp_path / "run"
    # debug_hash.toml: a config with no router-specific key (debug_topk.toml sets router_init_std, which this
    # router does not declare among its config_keys, so the config check would refuse it).
    train_module.main([
        "--job.config_file", str(CONFIGS / "debug_hash.toml"), "--job.dump_folder", str(dump),
        "--moe.router", NAME, "--training.steps", "3", "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--metrics.log_freq", "1", "--validation.no-enable",
        "--checkpoint.no-enable",
    ])
    scalars = read_run(dump / "tb")
    # The objective's own metrics, at every logged step, with the values it computed.
    assert scalars[f"{NAME}/steps_seen"] == {1: 1.0, 2: 2.0, 3: 3.0}
    loss_terms = scalars[f"{NAME}/loss_term"]
    assert sorted(loss_terms) == [1, 2, 3] and all(0 < v < 1 for v in loss_terms.values())  # mean sigmoid
    # The shared MoE metrics of any router, and a training loss that moves.
    assert set(scalars["moe/sparsity"]) == {1, 2, 3}
    losses = scalars["loss_metrics/global_avg_loss"]
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
    assert not any(tag.startswith("remoe/") or tag == "moe/aux_loss" for tag in scalars)


def test_an_unregistered_router_is_one_config_line(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_module.main([
            "--job.config_file", str(CONFIGS / "debug_topk.toml"), "--job.dump_folder", str(tmp_path),
            "--moe.router", NAME,
        ])
    assert exit_info.value.code == 2
    out = capsys.readouterr().out  # init_logger() logs to the sys.stdout of the moment
    errors = [line.split(" - ERROR - ", 1)[1] for line in out.splitlines() if " - ERROR - " in line]
    assert len(errors) == 1 and errors[0].startswith(f"config error: moe.router = '{NAME}'"), errors
    assert "'relu'" in errors[0] and "'expert_choice'" in errors[0]  # the registered names
