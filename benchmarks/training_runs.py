"""Benchmarks made of real training runs through the entry point (`python -m remoe_recipe.train`).

- dense_start: ReMoE's cost of its dense start. ReMoE (paper defaults: lambda_0 = 1e-8, alpha = 1.2) and
  TopK train the debug model side by side (two processes at once, one thread each), logging every step.
  Reported: the wall time of ReMoE's steps before it settles at the target sparsity (stages I + II)
  against the same number of its stage-III steps, and the whole run's time relative to TopK.
- quality: final validation loss of ReMoE, TopK (E=8, k=1) and dense at the same active size, steps and
  seeds, on the built-in corpus; mean and spread over seeds.
- small: the shipped train_configs/small_{remoe,topk,dense}.toml over seeds, as shipped, plus a TopK run
  compute-matched to each ReMoE run (paper §4.3; remoe_recipe.analysis.compute_match): validation loss and
  the routing health table (remoe_recipe.analysis.health). Four runs per seed, two at a time: about an hour and
  a half per seed on a 2-core CPU.
"""

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_table

REPO = Path(__file__).resolve().parents[1]


def _launch(config: str, dump: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "remoe_recipe.train", "--job.config_file", str(REPO / "train_configs" / config),
        "--job.dump_folder", str(dump), "--checkpoint.no-enable", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run_pairs(jobs: list[tuple[str, Path, list[str]]]) -> None:
    """Run jobs two at a time (one per core), raising on the first failure."""
    for i in range(0, len(jobs), 2):
        procs = [_launch(*job) for job in jobs[i : i + 2]]
        for proc, job in zip(procs, jobs[i : i + 2]):
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{job[0]} failed:\n{err[-3000:]}")


def _quality_table(title: str, losses: dict[str, list[float]]) -> dict:
    result = {
        r: {"mean": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
        for r, v in losses.items()
    }
    print_table(
        title, ["router", "mean", "stdev", "per seed"],
        [[r, f"{result[r]['mean']:.4f}", f"{result[r]['stdev']:.4f}", ", ".join(f"{x:.4f}" for x in result[r]["values"])]
         for r in losses],
    )
    return result


def _scalars(dump: Path) -> dict[str, dict[int, float]]:
    from remoe_recipe.analysis.runs import read_run

    return read_run(dump)


def dense_start(quick: bool = False) -> dict:
    steps = 200 if quick else 1000
    common = ["--training.steps", str(steps), "--training.seq_len", "64", "--training.local_batch_size", "4",
              "--metrics.log_freq", "1", "--validation.no-enable", "--lr_scheduler.warmup_steps", "20",
              "--moe.router_init_std", "0.01"]
    # The paper's init and controller, not the debug configs' (docs/training-dynamics.md, finding 15).
    paper_controller = ["--moe.l1_coeff_init", "1e-8", "--moe.l1_coeff_multiplier", "1.2"]
    with tempfile.TemporaryDirectory() as tmp:
        remoe_dir, topk_dir = Path(tmp) / "remoe", Path(tmp) / "topk"
        _run_pairs([("debug_remoe.toml", remoe_dir, common + paper_controller), ("debug_topk.toml", topk_dir, common)])
        remoe, topk = _scalars(remoe_dir), _scalars(topk_dir)
    step_time = "time_metrics/end_to_end(s)"
    settle = int(min(remoe["remoe/settling_step"].values()))
    # Step 1 holds start-up work (allocation, first-touch): both sums start at step 2.
    early = [remoe[step_time][s] for s in range(2, settle + 1)]
    late_steps = list(range(steps - len(early) + 1, steps + 1))
    late = [remoe[step_time][s] for s in late_steps]
    remoe_total = sum(remoe[step_time][s] for s in range(2, steps + 1))
    topk_total = sum(topk[step_time][s] for s in range(2, steps + 1))
    active = remoe["moe/active_experts_per_token"]
    result = {
        "steps": steps, "settling_step": settle,
        "stage12_seconds": sum(early), "same_number_of_stage3_steps_seconds": sum(late),
        "stage12_over_stage3": sum(early) / sum(late),
        "stage12_mean_active_experts": statistics.mean(active[s] for s in range(1, settle + 1)),
        "stage3_mean_active_experts": statistics.mean(active[s] for s in late_steps),
        "remoe_total_seconds": remoe_total, "topk_total_seconds": topk_total,
        "remoe_over_topk_total": remoe_total / topk_total,
        "stage12_share_of_remoe_run": sum(early) / remoe_total,
    }
    print_table(
        f"ReMoE's dense start ({steps}-step debug runs, seq 64 x 4, ReMoE and TopK side by side)",
        ["quantity", "value"],
        [
            ["settling step (stage III starts)", settle],
            ["stages I+II wall time / same number of stage-III steps", f"{result['stage12_over_stage3']:.2f}"],
            ["active experts per token: stages I+II / stage III",
             f"{result['stage12_mean_active_experts']:.2f} / {result['stage3_mean_active_experts']:.2f}"],
            ["stages I+II share of the ReMoE run", f"{100 * result['stage12_share_of_remoe_run']:.1f} %"],
            ["whole run: ReMoE / TopK wall time", f"{result['remoe_over_topk_total']:.3f}"],
        ],
    )
    return {"dense_start": result}


def quality(quick: bool = False) -> dict:
    seeds = [0] if quick else [0, 1, 2]
    steps = 100 if quick else 300
    common = ["--training.steps", str(steps), "--validation.enable", "--validation.freq", str(steps),
              "--validation.steps", "20", "--metrics.log_freq", "50"]
    routers = {"remoe": "debug_remoe.toml", "topk": "debug_topk.toml", "dense": "debug_dense.toml"}
    losses: dict[str, list[float]] = {r: [] for r in routers}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [
            (config, Path(tmp) / f"{router}-{seed}", [*common, "--debug.seed", str(seed)])
            for seed in seeds for router, config in routers.items()
        ]
        _run_pairs(jobs)
        for config, dump, overrides in jobs:
            router = next(r for r, c in routers.items() if c == config)
            losses[router].append(_scalars(dump)["validation_metrics/loss"][steps])
    result = _quality_table(f"Validation loss on the built-in corpus (debug model, {steps} steps, seeds {seeds})", losses)
    result["steps"], result["seeds"] = steps, seeds
    return {"quality": result}


def small(quick: bool = False) -> dict:
    from remoe_recipe.analysis.compute_match import match_run
    from remoe_recipe.analysis.health import assess, format_table, target_sparsity_of
    from remoe_recipe.metrics import read_expert_load

    seeds = [0] if quick else [0, 1, 2]
    common = ["--training.steps", "100"] if quick else []  # quick: the validation still runs at the last step
    routers = ("remoe", "topk", "dense")
    losses: dict[str, list[float]] = {r: [] for r in (*routers, "topk_matched")}
    rows, matched = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        dumps = {(r, seed): Path(tmp) / f"small_{r}_s{seed}" for seed in seeds for r in routers}
        _run_pairs([(f"small_{r}.toml", dumps[r, seed], [*common, "--debug.seed", str(seed)]) for r, seed in dumps])
        for seed in seeds:
            matched[seed] = match_run(dumps["remoe", seed]).steps_to_train
            dumps["topk_matched", seed] = Path(tmp) / f"small_topk_matched_s{seed}"
        _run_pairs([
            ("small_topk.toml", dumps["topk_matched", seed], ["--training.steps", str(matched[seed]), "--debug.seed", str(seed)])
            for seed in seeds
        ])
        for (router, seed), dump in dumps.items():
            scalars = _scalars(dump)
            val = scalars["validation_metrics/loss"]
            losses[router].append(val[max(val)])
            if router != "dense":
                rows.append(assess(dump.name, scalars, target_sparsity_of(dump), read_expert_load(dump)))
    result = _quality_table(f"Validation loss, small configs (seeds {seeds}; TopK matched: {matched} steps)", losses)
    print(format_table(rows))
    result["matched_topk_steps"], result["seeds"] = matched, seeds
    result["health"] = [vars(h) for h in rows]
    return {"small": result}
