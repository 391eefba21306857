"""Resuming from a corrupt, truncated or incompatible checkpoint stops in one line naming the step folder,
what differs and the option that helps; the checkpoints themselves are left as they were."""

import hashlib
import os
import shutil
import struct

import pytest
import torch

from remoe_recipe.infra.checkpoint_layout import CheckpointError, check_resume, read_metadata, read_saved_values
from tests.runs import run_training

RELU = {"router": "relu", "num_experts": 8, "granularity": 1}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 4-step ReMoE run with checkpoints at steps 2 and 4."""
    dump = tmp_path_factory.mktemp("saved")
    run_training(
        "debug_remoe.toml", dump, "--training.steps", "4", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--moe.l1_coeff_init", "1e-2", "--optimizer.lr", "2e-3",
    )
    return dump


def _copy(saved_run, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoint", dump / "checkpoint")
    return dump


def _digests(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
        for root, _, names in os.walk(folder) for name in names
    }


def test_train_state_holds_the_run_identity_and_stage_tracker(saved_run):
    path = str(saved_run / "checkpoint" / "step-4")
    state = read_saved_values(path, read_metadata(path), "train_state")
    assert {k: state[k] for k in RELU} == RELU
    assert state["step"] == 4 and "stage2_step" in state and "stage3_step" in state and state["l1_coeff"] > 0


def test_another_router_is_refused_naming_both(saved_run):
    path = str(saved_run / "checkpoint" / "step-4")
    with pytest.raises(CheckpointError) as info:
        check_resume(path, dict(RELU, router="topk"), 1, [], model_only=False)
    message = str(info.value)
    assert path in message and "router 'relu' there, 'topk' here" in message
    assert "--checkpoint.exclude_from_loading train_state" in message
    check_resume(path, RELU, 1, [], model_only=False)  # the same kind of run passes


def test_another_data_parallel_degree_is_refused_with_the_option(saved_run):
    path = str(saved_run / "checkpoint" / "step-4")
    with pytest.raises(CheckpointError) as info:
        check_resume(path, RELU, 2, [], model_only=False)
    message = str(info.value)
    assert path in message and "1 data-parallel ranks, this run has 2" in message
    assert "--checkpoint.exclude_from_loading dataloader" in message
    check_resume(path, RELU, 2, ["dataloader"], model_only=False)


def test_truncated_shard_and_torn_metadata_are_named(saved_run, tmp_path):
    dump = _copy(saved_run, tmp_path)
    step4 = dump / "checkpoint" / "step-4"
    shard = step4 / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError) as info:
        check_resume(str(step4), RELU, 1, [], model_only=False)
    message = str(info.value)
    assert f"shard __0_0.distcp is truncated ({size // 2:,} of" in message
    assert "--checkpoint.load_step N (saved: 2)" in message
    (step4 / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"step-4: its \.metadata cannot be read"):
        check_resume(str(step4), RELU, 1, [], model_only=False)


def test_silently_corrupted_optimizer_state_is_caught_on_load(saved_run, tmp_path):
    """256 KiB of 0xFF bytes (NaN as float32) inside one optimizer tensor: the run must stop naming it,
    and neither re-save it nor touch the checkpoints."""
    dump = _copy(saved_run, tmp_path)
    step4 = dump / "checkpoint" / "step-4"
    target = "optimizer.state.layers.1.moe.experts.w1.exp_avg_sq"
    [info] = [v for k, v in read_metadata(str(step4)).storage_data.items() if k.fqn == target]
    assert info.length > 2 * 256 * 1024
    with open(step4 / info.relative_path, "r+b") as f:
        f.seek(info.offset + 4096)  # inside the tensor's data: past the archive's header, before its index
        f.write(b"\xff" * (256 * 1024))
    assert struct.unpack("f", b"\xff" * 4)[0] != struct.unpack("f", b"\xff" * 4)[0]  # NaN
    before = _digests(dump / "checkpoint")
    # (Also a changed learning rate, to see the resume warn that the checkpoint's schedule wins.)
    proc = run_training(
        "debug_remoe.toml", dump, "--training.steps", "6", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--moe.l1_coeff_init", "1e-2", "--optimizer.lr", "1e-3", check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "optimizer.lr = 0.001 differs from the checkpoint's 0.002" in out
    [error] = [line for line in out.splitlines() if " - ERROR - " in line]
    assert str(step4) in error and "layers.1.moe.experts.w1" in error and "exp_avg_sq" in error
    assert "NaN/inf" in error and "--checkpoint.load_step N (saved: 2)" in error
    assert "step:" not in out
    assert _digests(dump / "checkpoint") == before


def test_another_expert_count_is_refused_naming_both_sides(saved_run):
    """The shape check that runs before any weight is read (one process; the multi-rank cases are in
    tests/test_parallel.py)."""
    import copy

    from remoe_recipe.config import ConfigError, MoEConfig
    from remoe_recipe.infra.checkpoint_layout import check_checkpoint_fits
    from remoe_recipe.infra.layout import check_layout
    from remoe_recipe.model import ReMoETransformer, remoe_flavors
    from remoe_recipe.preflight import load_config

    config = load_config(["--job.config_file", str(saved_run / "config.toml"), "--moe.num_experts", "16"])
    args = copy.deepcopy(remoe_flavors()["debugmodel"])
    args.moe, args.vocab_size, args.max_seq_len = MoEConfig(num_experts=16), 4096, 64
    with torch.device("meta"):
        model = ReMoETransformer(args)
    path = str(saved_run / "checkpoint" / "step-4")
    with pytest.raises(ConfigError) as info:
        check_checkpoint_fits(model, path, check_layout(config, 1))
    message = str(info.value)
    assert path in message and "layers.0.moe.experts.w1 is [8, " in message and "[16, " in message
    assert "a new job.dump_folder" in message
