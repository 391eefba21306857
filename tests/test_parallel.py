"""Scale-out on CPU: FSDP2, expert parallelism, torch.compile and activation checkpointing train the
same run as one process; checkpoints reshard between layouts; bad layouts fail at start-up; the dry
run validates a layout without its hardware; two torchrun "nodes" train one run.

The reference for every multi-process layout is a one-process run (no FSDP, no DTensor, no
all-to-all, no compile) that reads its data as the layout's data-parallel ranks do (tests/emulated_dp.py):
same seed, same global batch split into the same micro-batches. Multi-process runs use gloo via
torchrun, one thread per process.

Tolerances. Every layout computes the same sums in a different order (FSDP reduce-scatters gradients
per shard, expert parallelism regroups tokens per expert, compile fuses kernels), so fp32 results differ
in the last bits. Measured on this machine over 10 steps: losses within 1e-6 relative; the logged
grad_norm within 3e-4, and 2e-3 at a loss spike where the gradient is most sensitive to the weights
(torch's fp32 CPU vector norm of a large tensor is itself off by ~1e-4, differently for each shard size;
the clip coefficient inherits it, and Adam is nearly invariant to that scale);
sparsity off by one gate of the 8192 per step at most (a gate at the ReLU boundary, ~1e-7, flips). A
flipped gate changes ReMoE's load-balance weight f of its expert and the router gradient of that row,
so after one the weights drift apart slightly: per-tensor relative difference <= 4e-4 at step 10
(<= 7e-6 before any flip). A layout error is much larger: a lost, misrouted or double-counted gradient
changes Adam's update of the affected weights by O(lr) = 2e-3 per step, a relative change of ~0.2 of
an expert's weights (std 0.01) after one step, and moves the loss by > 1e-3. The tolerances leave 5-25x
headroom over the measurements and stay >= 20x below such errors.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remoe_recipe.analysis.runs import read_run
from remoe_recipe.config import ConfigError
from tests.runs import CONFIGS, REPO

STEPS = 10
DP = 2  # data-parallel ranks of the 2-process layouts (expert parallelism borrows them)
LR = 2e-3  # debug configs
LOSS_RTOL = 1e-5  # measured <= 4e-7 (module docstring)
GRAD_NORM_RTOL = 1e-2  # measured <= 2e-3 (at a loss spike); a doubled or halved gradient is a factor 2
PARAM_RTOL = 2e-3  # per tensor, ||w - w_ref|| / ||w_ref||; measured <= 4e-4
SPARSITY_ATOL = 1e-3  # 8 of the 8192 gates of a step (measured: at most 1)

RUN = [
    "--training.seq_len", "64", "--training.local_batch_size", "2",
    "--training.global_batch_size", str(2 * DP), "--training.steps", str(STEPS),
    "--lr_scheduler.warmup_steps", "2", "--moe.l1_coeff_init", "1e-2", "--debug.seed", "0",
    "--metrics.log_freq", "1", "--metrics.save_for_all_ranks", "--validation.no-enable",
    "--checkpoint.enable", "--checkpoint.interval", "5", "--checkpoint.keep_latest_k", "0",
]
EP2 = ["--parallelism.expert_parallel_degree", "2"]
LAYOUTS = {
    "fsdp": [],
    "ep2": EP2,
    # inductor, torch.compile's default backend: the C++ kernels users get, compiled once per run
    "ep2_compile": [*EP2, "--compile.enable", "--compile.backend", "inductor"],
    "ep2_full_ac": [*EP2, "--activation_checkpoint.mode", "full"],
}
ROUTERS = {"relu": "debug_remoe.toml", "topk": "debug_topk.toml"}
# λ0 is a relu key: the config check refuses it on a topk run
ROUTER_ARGS = {"relu": [], "topk": ["--moe.l1_coeff_init", "1e-8"]}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def launch(config: str, dump: Path, *overrides: str, nproc: int = 1, reference_ranks: int = 0,
           env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """One training job through the real entry point (torchrun for nproc > 1), or the one-process
    reference reading data as `reference_ranks` ranks."""
    args = ["--job.config_file", str(CONFIGS / config), "--job.dump_folder", str(dump), *overrides]
    if reference_ranks:
        cmd = [sys.executable, "-m", "tests.emulated_dp", str(reference_ranks), *args]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "remoe_recipe.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "remoe_recipe.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def per_rank(dump: Path) -> list[dict]:
    return [read_run(d) for d in sorted(dump.glob("tb/*/rank_*"))]


def model_weights(dump: Path, step: int) -> dict[str, torch.Tensor]:
    """The model parameters of a DCP checkpoint, whatever layout saved them, as full tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = dump / f"step-{step}.pt"
    dcp_to_torch_save(dump / "checkpoint" / f"step-{step}", out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.split(".")[0] in
            ("tok_embeddings", "layers", "norm", "output")}


def assert_curves_match(run: dict, ref: dict, steps, what: str) -> dict[str, float]:
    """Loss within LOSS_RTOL, lambda equal, sparsity / aux loss close, at every step; returns max diffs."""
    diffs = {}
    loss, ref_loss = run["loss_metrics/global_avg_loss"], ref["loss_metrics/global_avg_loss"]
    for s in steps:
        assert loss[s] == pytest.approx(ref_loss[s], rel=LOSS_RTOL), (what, "loss", s)
    diffs["loss_rel"] = max(abs(loss[s] - ref_loss[s]) / ref_loss[s] for s in steps)
    for s in steps:
        assert run["grad_norm"][s] == pytest.approx(ref["grad_norm"][s], rel=GRAD_NORM_RTOL), (what, s)
    diffs["grad_norm_rel"] = max(abs(run["grad_norm"][s] - ref["grad_norm"][s]) / ref["grad_norm"][s] for s in steps)
    if "remoe/l1_coeff" in ref:
        for s in steps:
            # lambda moves by exact factors of alpha: the same sequence of sparsity-vs-target decisions
            assert run["remoe/l1_coeff"][s] == pytest.approx(ref["remoe/l1_coeff"][s], rel=1e-6), (what, s)
            assert abs(run["moe/sparsity"][s] - ref["moe/sparsity"][s]) <= SPARSITY_ATOL, (what, s)
        diffs["sparsity_abs"] = max(abs(run["moe/sparsity"][s] - ref["moe/sparsity"][s]) for s in steps)
    else:
        for s in steps:
            assert run["moe/aux_loss"][s] == pytest.approx(ref["moe/aux_loss"][s], rel=1e-4), (what, s)
    return diffs


def assert_ranks_agree(dump: Path, nranks: int) -> dict:
    """Every rank logs the same loss, lambda and sparsity (they are all-reduced, not local)."""
    ranks = per_rank(dump)
    assert len(ranks) == nranks
    for tag in ("loss_metrics/global_avg_loss", "remoe/l1_coeff", "moe/sparsity", "moe/aux_loss"):
        if tag in ranks[0]:
            assert all(r[tag] == ranks[0][tag] for r in ranks), tag
    return ranks[0]


def assert_weights_match(dump: Path, ref_dump: Path, step: int, what: str) -> float:
    got, ref = model_weights(dump, step), model_weights(ref_dump, step)
    assert got.keys() == ref.keys() and len(ref) > 0
    worst = 0.0
    for name, value in ref.items():
        assert got[name].shape == value.shape, name
        rel = ((got[name] - value).norm() / value.norm()).item()
        assert rel <= PARAM_RTOL, (what, name, rel)
        worst = max(worst, rel)
    return worst


class Runs:
    """Each training run at most once per test session, started when a test first needs it."""

    def __init__(self, root: Path):
        self.root = root
        self.output: dict[tuple[str, str], subprocess.CompletedProcess] = {}

    def get(self, router: str, layout: str) -> Path:
        dump = self.root / f"{router}_{layout}"
        if (router, layout) not in self.output:
            if layout == "reference":
                proc = launch(ROUTERS[router], dump, *RUN, *ROUTER_ARGS[router], reference_ranks=DP)
            else:  # TORCH_LOGS=recompiles: torch.compile logs every recompilation
                env = {"TORCH_LOGS": "recompiles"} if "compile" in layout else None
                proc = launch(ROUTERS[router], dump, *RUN, *ROUTER_ARGS[router], *LAYOUTS[layout], nproc=DP, env=env)
            self.output[(router, layout)] = proc
        return dump


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("layouts"))


MEASURED: dict[str, dict] = {}  # printed at the end with -s; the numbers the docstring quotes


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    for key, value in MEASURED.items():
        print(f"measured {key}: {value}")


# ------------------------------------------------------------------------------------------------
# 1. bad layouts fail at start-up, one line naming the key
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world_size, override, expected",
    [
        (6, ["--parallelism.expert_parallel_degree", "3"],
         "parallelism.expert_parallel_degree = 3 does not divide the 8 experts"),
        (2, ["--parallelism.expert_parallel_degree", "4"],
         "parallelism.expert_parallel_degree = 4 does not divide the 2 FSDP ranks"),
        (8, ["--parallelism.expert_parallel_degree", "4", "--parallelism.data_parallel_replicate_degree", "4"],
         "parallelism.expert_parallel_degree = 4 does not divide the 2 FSDP ranks"),
        (1, ["--moe.granularity", "3"], "moe.granularity = 3 does not divide the FFN width"),
        (2, [*EP2, "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
         "activation_checkpoint.selective_ac_option = 'op' with parallelism.expert_parallel_degree = 2"),
        (2, ["--parallelism.data_parallel_shard_degree", "4"],
         "data_parallel_shard_degree (4) = 4, but there are 2 ranks"),
    ],
    ids=["E_not_divisible_by_EP", "EP_not_dividing_dp", "EP_not_dividing_dp_shard_in_HSDP",
         "granularity_not_dividing_ffn", "op_sac_with_ep", "degrees_not_world"],
)
def test_bad_layout_fails_at_parse_time_in_one_line(monkeypatch, world_size, override, expected):
    from remoe_recipe.preflight import load_config

    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # what torchrun sets before the entry point runs
    with pytest.raises(ConfigError) as info:
        load_config(["--job.config_file", str(CONFIGS / "debug_remoe.toml"), *override])
    message = str(info.value)
    assert expected in message and "\n" not in message
    if "'op'" in expected:
        assert "use activation_checkpoint.mode = 'full'" in message  # says what to use instead


def test_expert_parallel_without_experts_fails_in_one_line(monkeypatch):
    """The dense baseline's own config (debug_remoe.toml with --moe.router dense would first be refused for
    its router-specific keys) with expert parallelism: one line naming the router."""
    from remoe_recipe.preflight import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        load_config(["--job.config_file", str(CONFIGS / "debug_dense.toml"), *EP2])
    message = str(info.value)
    assert "moe.router = 'dense' has no experts" in message and "\n" not in message


def test_op_sac_with_ep_stops_the_entry_point_before_training(tmp_path):
    """Through `python -m remoe_recipe.train` as torchrun starts it (WORLD_SIZE=2 set): exit 2 and one
    `config error:` line before any process group or mesh exists."""
    proc = launch(
        "debug_remoe.toml", tmp_path, *RUN, *EP2, "--activation_checkpoint.mode", "selective",
        "--activation_checkpoint.selective_ac_option", "op", env={"WORLD_SIZE": "2"}, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "config error: activation_checkpoint.selective_ac_option = 'op'" in out
    assert "step:" not in out and "Building device mesh" not in out


# ------------------------------------------------------------------------------------------------
# 2. compile: token counts per expert change every step, graphs do not
# ------------------------------------------------------------------------------------------------


def _small_model(router: str):
    from remoe_recipe.config import MoEConfig
    from remoe_recipe.model import ReMoETransformer, remoe_flavors

    args = remoe_flavors()["debugmodel"]
    args.moe = MoEConfig(router=router, num_experts=8, top_k=1)
    args.dim, args.n_layers, args.ffn_dim, args.vocab_size, args.max_seq_len = 64, 2, 128, 256, 32
    torch.manual_seed(0)
    model = ReMoETransformer(args)
    model.init_weights()
    return model


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only spins, and slows everything on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("router, ac", [("relu", "none"), ("relu", "full"), ("relu", "selective"), ("topk", "none")])
def test_compile_does_not_recompile_when_tokens_per_expert_change(router, ac, one_thread):
    """Eight steps whose routing differs every step: graphs are built in the first step only, the
    compiled model matches eager, and the router records are taken once per forward in every AC mode."""
    import copy

    from torch._dynamo.utils import counters
    from torchtitan.config.job_config import ActivationCheckpoint, Compile
    from torchtitan.distributed.activation_checkpoint import apply_ac

    from remoe_recipe.infra.compile import apply_compile
    from remoe_recipe.platform import enable_cpu_training

    enable_cpu_training()  # the fp32 grouped GEMM's compile-time shape function (platform.py)
    torch._dynamo.reset()
    counters.clear()
    eager = _small_model(router)
    model = copy.deepcopy(eager)
    if ac != "none":
        apply_ac(model, ActivationCheckpoint(mode=ac, selective_ac_option="1"))
    apply_compile(model, Compile(enable=True, backend="aot_eager"))
    gen = torch.Generator().manual_seed(1)
    frames, rows = [], []
    for step in range(8):
        tokens = torch.randint(0, 256, (2, 16), generator=gen)
        losses = []
        for m in (model, eager):
            logits = m(tokens)
            records = m.pop_router_records()
            assert len(records) == 2  # once per layer and forward
            losses.append(logits.float().square().mean() + sum(r.loss_term for r in records))
            losses[-1].backward()
            assert m.pop_router_records() == []  # the AC recompute in backward records nothing
        rows.append(tuple(int(n) for n in records[0].tokens_per_expert))  # layer 0, per expert
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
        frames.append(counters["stats"]["unique_graphs"])
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        ref = grads[name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")].grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-7)
    assert len(set(rows)) == len(rows), rows  # tokens per expert differ in every step
    assert frames[0] > 0
    assert frames[-1] == frames[0], f"recompiled after step 1: compiled frames per step {frames}"
    MEASURED[f"compile {router} ac={ac}"] = f"graphs compiled after each step {frames}"


def test_recompilation_counter_sees_a_static_shape_recompile():
    """Control for the test above: the same counter registers a recompilation when the grouped GEMM
    is compiled without marking the row count dynamic."""
    from torch._dynamo.utils import counters

    from remoe_recipe.model.moe import Experts
    from remoe_recipe.platform import enable_cpu_training

    enable_cpu_training()
    torch._dynamo.reset()
    counters.clear()
    static = torch.compile(Experts.grouped_swiglu, backend="aot_eager", fullgraph=True)
    w1, w2, w3 = torch.randn(2, 8, 4), torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    for rows in (16, 24):
        static(w1, w2, w3, torch.randn(rows, 4), torch.tensor([8, rows - 8]))
    assert counters["stats"]["unique_graphs"] == 2


# ------------------------------------------------------------------------------------------------
# 3. every 2-process layout trains the one-process run
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_layout_trains_the_one_process_run(runs, router, layout):
    ref_dump = runs.get(router, "reference")
    dump = runs.get(router, layout)
    ref = read_run(ref_dump)
    run = assert_ranks_agree(dump, DP)
    diffs = assert_curves_match(run, ref, range(1, STEPS + 1), f"{router} {layout}")
    assert len(run["loss_metrics/global_avg_loss"]) == STEPS
    diffs["params_rel"] = assert_weights_match(dump, ref_dump, STEPS, f"{router} {layout}")
    if "compile" in layout:
        log = runs.output[(router, layout)].stderr
        assert "Recompiling function" not in log, "compiled blocks recompiled during the run"
    MEASURED[f"{router} {layout}"] = {k: f"{v:.2g}" for k, v in diffs.items()}


# ------------------------------------------------------------------------------------------------
# 4. checkpoints reshard between layouts
# ------------------------------------------------------------------------------------------------


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    shutil.copytree(src / "checkpoint" / f"step-{step}", dst / "checkpoint" / f"step-{step}")


@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep1_and_continues_the_curve(runs, tmp_path):
    """Saved at step 5 by EP=2 on 2 ranks, resumed by FSDP only (EP=1) on 2 ranks: steps 6..10
    follow the uninterrupted run, and the final weights are the one-process run's."""
    ref_dump = runs.get("relu", "reference")
    saved = runs.get("relu", "ep2")
    _copy_checkpoint(saved, tmp_path, 5)
    proc = launch("debug_remoe.toml", tmp_path, *RUN, nproc=DP)
    assert "Loading the checkpoint from" in proc.stdout + proc.stderr
    resumed = assert_ranks_agree(tmp_path, DP)
    assert sorted(resumed["loss_metrics/global_avg_loss"]) == list(range(6, STEPS + 1))
    diffs = assert_curves_match(resumed, read_run(ref_dump), range(6, STEPS + 1), "resumed at EP=1")
    diffs["params_rel"] = assert_weights_match(tmp_path, ref_dump, STEPS, "resumed at EP=1")
    MEASURED["resume EP=2 -> EP=1"] = {k: f"{v:.2g}" for k, v in diffs.items()}


def _one_process_loss(weights: dict, overrides: list[str], world: int) -> float:
    """Language-model loss of `weights` on the first global batch of a `world`-rank run, in this
    process, with a plain (unsharded) model: the independent expectation for a resumed run's step."""
    from torchtitan.protocols.train_spec import get_train_spec

    from remoe_recipe.model import ReMoETransformer, remoe_flavors
    from remoe_recipe.preflight import load_config

    config = load_config(["--job.config_file", str(CONFIGS / "debug_remoe.toml"), *overrides, "--validation.no-enable"])
    args = remoe_flavors()["debugmodel"]
    args.update_from_config(config)
    model = ReMoETransformer(args)
    model.load_state_dict(weights, strict=True)
    spec = get_train_spec("remoe")
    tokenizer = spec.build_tokenizer_fn(config)
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(world):
            inputs, labels = next(iter(spec.build_dataloader_fn(world, rank, tokenizer, config)))
            logits = model(inputs["input"])
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
            count += labels.numel()
    return total / count


@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep4_on_4_ranks_and_trains(runs, tmp_path):
    """The same step-5 checkpoint on 4 ranks with EP=4 (one expert shard per rank, twice as many
    data-parallel ranks). The data loader's position cannot move to another number of ranks
    (torchtitan's limitation), so the 4-rank run starts the data over: its first step must see exactly
    the saved weights, and it trains on with one lambda and sparsity on all ranks."""
    saved = runs.get("relu", "ep2")
    _copy_checkpoint(saved, tmp_path, 5)
    four = ["--training.global_batch_size", "8", "--parallelism.expert_parallel_degree", "4",
            "--checkpoint.exclude_from_loading", "dataloader"]
    launch("debug_remoe.toml", tmp_path, *RUN, *four, nproc=4)
    run = assert_ranks_agree(tmp_path, 4)
    loss = run["loss_metrics/global_avg_loss"]
    assert sorted(loss) == list(range(6, STEPS + 1))
    expected = _one_process_loss(model_weights(saved, 5), RUN[:4], 4)  # seq_len 64, local batch 2
    assert loss[6] == pytest.approx(expected, rel=LOSS_RTOL)
    saved_lambda = read_run(saved)["remoe/l1_coeff"]
    assert run["remoe/l1_coeff"][6] == pytest.approx(saved_lambda[6], rel=1e-6)  # lambda came back too
    assert loss[STEPS] < loss[6]
    MEASURED["resume EP=2 -> EP=4 first loss"] = f"{loss[6]:.6f} vs one process {expected:.6f}"


@pytest.mark.slow
def test_checkpoint_of_another_expert_shape_fails_naming_both_layouts(runs, tmp_path):
    saved = runs.get("relu", "ep2")
    _copy_checkpoint(saved, tmp_path, 5)
    proc = launch("debug_remoe.toml", tmp_path, *RUN, "--moe.num_experts", "16", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    line = next(line for line in out.splitlines() if "cannot be loaded by" in line)
    assert "saved by 2 ranks" in line and "experts w1 [8, 512, 128] in 2 shards" in line
    assert "this run: 1 rank:" in line and "experts w1 [16, 512, 128]" in line
    assert "layers.0.moe.experts.w1 is [8, 512, 128] there, [16, 512, 128] here" in line
    assert "step:" not in out


# ------------------------------------------------------------------------------------------------
# 5. dry run without the hardware
# ------------------------------------------------------------------------------------------------


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "remoe_recipe.dryrun", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_validates_the_182M_paper_config_on_8_ranks_with_ep8():
    from remoe_recipe.model import remoe_flavors

    proc = _dry_run("--job.config_file", str(CONFIGS / "paper_182M_remoe.toml"), "--world_size", "8",
                    "--parallelism.expert_parallel_degree", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    args = remoe_flavors()["182M"]
    counts = args.param_counts()
    assert counts.total == 777_087_744  # the paper's 777M at E = 8 (README)
    # every rank holds 1/8 of the dense weights (FSDP over 8) and 1 of the 8 experts of each layer
    per_rank = (counts.total - counts.ffn_total) // 8 + counts.ffn_total // 8
    assert f"per rank (rank 0): {per_rank:,} parameters" in out, out
    assert "meshes (size > 1): batch=8, loss=8, fsdp=8, ep=8" in out
    assert re.search(r"memory estimate per rank: [0-9.]+ GiB", out) and "peak estimate" in out
    assert "dry run OK" in out
    MEASURED["dry run 182M E=8 EP=8"] = "\n" + out


@pytest.mark.slow
def test_dry_run_hsdp_with_ep_and_a_failing_layout():
    ok = _dry_run("--job.config_file", str(CONFIGS / "paper_182M_remoe.toml"), "--world_size", "16",
                  "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.expert_parallel_degree", "4")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "meshes (size > 1): batch=16, loss=16, dp_replicate=2, fsdp=8, ep=4, efsdp=2" in ok.stdout
    # dense weights: 1/8 within each replica; experts: 1/4 per expert-parallel rank, 1/2 of that by FSDP
    assert "dense (1/8 per replica) + " in ok.stdout and " experts (1/8 of " in ok.stdout
    bad = _dry_run("--job.config_file", str(CONFIGS / "paper_182M_remoe.toml"), "--world_size", "8",
                   "--parallelism.expert_parallel_degree", "16")
    assert bad.returncode == 2
    out = bad.stdout + bad.stderr
    assert "config error: parallelism.expert_parallel_degree = 16 does not divide the 8 experts" in out


# ------------------------------------------------------------------------------------------------
# 6. two torchrun "nodes" on this machine train one run
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_train_one_run_with_hsdp_and_ep(tmp_path):
    """scripts/multinode_local.sh: two torchrun agents (--nnodes 2 --node_rank 0|1, c10d rendezvous on
    localhost), two processes each, in the layout a cluster would use: HSDP replicating over the two
    nodes and sharding within each, experts split over the two ranks of a node (EP=2). The run is the
    one-process run reading data as its 4 data-parallel ranks."""
    four = ["--training.global_batch_size", "8", "--parallelism.data_parallel_replicate_degree", "2", *EP2]
    ref_dump = tmp_path / "reference"
    launch("debug_remoe.toml", ref_dump, *RUN, "--training.global_batch_size", "8", reference_ranks=4)
    dump = tmp_path / "run"
    cmd = ["scripts/multinode_local.sh", str(CONFIGS / "debug_remoe.toml"),
           "--job.dump_folder", str(dump), *RUN, *four, "--metrics.log_all_ranks"]  # each node's log is read
    env = dict(os.environ, LOG_DIR=str(tmp_path / "logs"), NPROC_PER_NODE="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for node in (0, 1):  # each node ran two ranks of the same 4-rank job
        log = (tmp_path / "logs" / f"node{node}.log").read_text()
        assert "Parallel layout: 4 ranks: dp_shard=2 x dp_replicate=2; experts ep=2 x efsdp=1" in log
        assert "Applied HSDP" in log and f"step: {STEPS}" in log
    run = assert_ranks_agree(dump, 4)
    diffs = assert_curves_match(run, read_run(ref_dump), range(1, STEPS + 1), "two nodes")
    diffs["params_rel"] = assert_weights_match(dump, ref_dump, STEPS, "two nodes")
    MEASURED["two nodes x 2 ranks (relu, HSDP 2x2, EP=2)"] = {k: f"{v:.2g}" for k, v in diffs.items()}


def test_multinode_local_script_passes_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck missing: install the test extra"
    proc = subprocess.run(["shellcheck", "scripts/multinode_local.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    usage = subprocess.run(["bash", "scripts/multinode_local.sh"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
