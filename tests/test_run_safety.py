"""A run never saves a non-finite state, saves on SIGTERM/SIGUSR1, and never shares its folder.

Each case runs the real entry point on CPU for a few steps and checks the one-line message names the
culprit and that nothing already written is lost.
"""

import json
import math
import re
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from remoe_recipe.config import ConfigError
from remoe_recipe.finiteness import describe_non_finite
from remoe_recipe.config import MoEConfig
from remoe_recipe.model import ReMoEModelArgs, ReMoETransformer
from remoe_recipe.routing_stats import StepRoutingStats
from remoe_recipe.run_folder import LOCK_NAME, RunLock
from tests.runs import REPO, run_training, training_command


def _error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if " - ERROR - " in line]


def _logged_losses(text: str) -> dict[int, float]:
    """{step: loss} from torchtitan's colored step lines."""
    losses = {}
    for m in re.finditer(r"step:\s+(\d+)\s+\S*loss:\s+(\S+?)\s", re.sub(r"\x1b\[[0-9;]*m", "", text)):
        losses[int(m.group(1))] = float(m.group(2))
    return losses


def _all_finite(step_dir, tmp_path) -> bool:
    out = tmp_path / f"{os.path.basename(step_dir)}.pt"
    dcp_to_torch_save(step_dir, out)
    state = torch.load(out, weights_only=False)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    found = [t for t in tensors(state) if t.is_floating_point()]
    assert found
    return all(bool(torch.isfinite(t).all()) for t in found)


def test_nan_stops_before_saving_and_keeps_the_good_checkpoint(tmp_path):
    """lr = 1e6 diverges within a few steps. With a checkpoint every step and keep_latest_k = 2, saved
    NaN steps would delete the last good ones; the run must stop before that save, exit non-zero."""
    proc = run_training(
        "debug_remoe.toml", tmp_path, "--optimizer.lr", "1e6", "--training.steps", "6",
        "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2",
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == 1, errors
    losses = _logged_losses(proc.stdout + proc.stderr)
    good = max(losses)  # the last step that completed (and was logged)
    assert all(math.isfinite(v) for v in losses.values())
    bad = good + 1
    assert f"non-finite training value at step {bad}:" in errors[0]
    assert "layer " in errors[0] or "weight " in errors[0] or "loss" in errors[0]
    saved = sorted(os.listdir(tmp_path / "checkpoint"))
    assert saved == [f"step-{s}" for s in range(max(1, good - 1), good + 1)], saved
    assert f"step-{good}" in errors[0]
    for name in saved:
        assert _all_finite(tmp_path / "checkpoint" / name, tmp_path)


def test_nan_router_is_named_and_never_reads_as_sparse():
    """NaN gates fail `gates > 0`, so a NaN layer used to read as 100 % sparse."""
    args = ReMoEModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16,
        moe=MoEConfig(router="relu", num_experts=4, top_k=1), flavor="test",
    )
    args.validate()
    torch.manual_seed(0)
    model = ReMoETransformer(args)
    model.init_weights()
    router = next(n for n, _ in model.named_parameters() if ".moe." in n and "router" in n)
    with torch.no_grad():
        dict(model.named_parameters())[router].view(-1)[0] = float("nan")
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    model(tokens)
    records = model.pop_router_records()
    stats = StepRoutingStats(args.n_layers, args.num_routed_experts, torch.device("cpu"))
    stats.add(records, torch.tensor(1.0), torch.tensor(32))
    reduced = stats.reduce(None)
    assert math.isnan(reduced.layer_sparsity[0]) and math.isnan(reduced.sparsity)
    values = [1.0, 1.0, *reduced.layer_loss_term.tolist(), *reduced.layer_sparsity.tolist()]
    message = describe_non_finite(7, values, args.n_layers, [model])
    assert message.startswith("non-finite training value at step 7: weight ")
    assert router in message
    with torch.no_grad():
        dict(model.named_parameters())[router].view(-1)[0] = 0.0
    message = describe_non_finite(7, values, args.n_layers, [model])
    assert "layer 0 router" in message
    assert describe_non_finite(7, [1.0, 2.0] + [0.5] * 4, args.n_layers, [model]) is None


def _start(dump, *overrides):
    cmd, env = training_command("debug_remoe.toml", dump, *overrides)
    log = open(dump.parent / f"{dump.name}.log", "w+")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _wait_for(log, text, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        log.seek(0)
        content = log.read()
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{content[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} after {timeout}s")


def test_sigterm_saves_the_current_step_and_the_run_resumes(tmp_path):
    """SIGTERM (preemption): finish the step, save it, exit 0; the same command resumes."""
    sig = signal.SIGTERM
    dump = tmp_path / "run"
    overrides = ["--checkpoint.enable", "--checkpoint.interval", "1000", "--training.steps", "400"]
    proc, log = _start(dump, *overrides)
    _wait_for(log, "step:  3", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0
    log.seek(0)
    text = log.read()
    stopped = max(_logged_losses(text))
    assert f"{sig.name} received: stopped after step {stopped} of 400" in text
    assert sorted(os.listdir(dump / "checkpoint")) == [f"step-{stopped}"]
    assert not (dump / LOCK_NAME).exists()
    resumed = run_training("debug_remoe.toml", dump, *overrides[:-1], str(stopped + 1))
    assert f"Training starts at step {stopped + 1}" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_sigusr1_through_torchrun_stops_both_ranks_at_one_step(tmp_path):
    """What scripts/slurm.sbatch sets up: torchrun forwards SIGUSR1 (PET_SIGNALS_TO_HANDLE) to its workers;
    the ranks agree on one step, save it together and exit 0 (torchrun itself then reports the signal)."""
    dump = tmp_path / "run"
    cmd, env = training_command(
        "debug_remoe.toml", dump, "--checkpoint.enable", "--checkpoint.interval", "1000", "--training.steps", "400",
        nproc=2,
    )
    env["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(log, "step 3/400", proc, timeout=300)
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=300)
    log.seek(0)
    text = log.read()
    [stopped] = {int(m) for m in re.findall(r"SIGUSR1 received: stopped after step (\d+) of 400", text)}
    step_dir = dump / "checkpoint" / f"step-{stopped}"
    assert sorted(p.name for p in step_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def _main_error(capsys, dump, *overrides) -> str:
    """Run the entry point in this process up to its start-up checks; the one error line it logs."""
    from remoe_recipe import train

    argv = ["--job.config_file", str(REPO / "train_configs" / "debug_remoe.toml"), "--job.dump_folder", str(dump),
            *overrides]
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    out = capsys.readouterr().out  # init_logger() logs to the sys.stdout of the moment
    [error] = [line.split(" - ERROR - ", 1)[1] for line in out.splitlines() if " - ERROR - " in line]
    return error


def test_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01 00:00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    error = _main_error(capsys, tmp_path)
    assert f"pid {os.getpid()}" in error and socket.gethostname() in error and "in use by another run" in error
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == holder  # the holder's lock is untouched


def test_stale_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert lock.took_over["pid"] == dead.pid
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # Another host's lock is stale only once its heartbeat is old.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match="host elsewhere, pid 1"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert lock.took_over["host"] == "elsewhere"
    lock.release()


def test_unwritable_checkpoint_folder_fails_before_step_one(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    error = _main_error(capsys, blocker / "run", "--checkpoint.enable")
    assert "checkpoint.folder" in error and str(blocker / "run" / "checkpoint") in error
