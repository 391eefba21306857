"""Zero-shot downstream evaluation with lm-evaluation-harness, laid out like the paper's Table 2.

    python -m remoe_recipe.evaluate --checkpoint outputs/run/checkpoint [--step N] --tasks table2
    python -m remoe_recipe.evaluate --hf hf/run --tasks arc_easy,piqa --limit 200

`table2` is the paper's seven tasks (ARC-Challenge, ARC-Easy, BoolQ, HellaSwag, LAMBADA (OpenAI), PIQA,
RACE), zero-shot, accuracy (`acc`; the paper does not say acc or acc_norm, both are in the JSON).
A checkpoint runs through the recipe's own model (no export; `--device` CPU or CUDA, `--batch-size`);
an exported folder through lm-eval's `hf` model. Results: the table on stdout, the full lm-eval result as
JSON in RUN/eval/ (or --output), and `eval/<task>` accuracies as TensorBoard scalars at the
checkpoint's step in RUN/<metrics.save_tb_folder>/eval.

Offline: `--data-dir DIR` reads each Table 2 task's evaluation split from DIR/<task>/<split>.jsonl
(written once on a networked machine by `--download-data DIR`). A user's own task YAMLs: `--include_path`.
"""

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from remoe_recipe.routers import get_router, router_names

TABLE2_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "piqa", "race"]
# lm-eval's YAML of each (relative to lm_eval/tasks): a task manager over these folders alone is
# built in well under a second, the full index of ~14k task files takes ~10 s.
TABLE2_YAMLS = {
    "arc_challenge": "arc/arc_challenge.yaml", "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml", "piqa": "piqa/piqa.yaml", "race": "race/race.yaml",
}
TABLE2_HEADERS = ["ARC-c", "ARC-e", "BoolQ", "HellaSwag", "LAMBADA", "PIQA", "RACE"]
METRIC = "acc"


class EvaluateError(ValueError):
    pass


def expand_tasks(spec: str) -> list[str]:
    names = []
    for name in (n.strip() for n in spec.split(",")):
        if name:
            names.extend(TABLE2_TASKS if name == "table2" else [name])
    if not names:
        raise EvaluateError(f"--tasks {spec!r}: no task named")
    return list(dict.fromkeys(names))


def eval_split(task) -> str:
    """The split lm-eval evaluates: test if the task has one, else validation."""
    return "test" if task.has_test_docs() else "validation"


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def local_task_yamls(tasks: list[str], data_dir: Path, out: Path) -> None:
    """For every Table 2 task, a YAML that includes lm-eval's own and reads DIR/<task>/<split>.jsonl
    instead of the hub (same name: include paths override the built-in tasks). Other tasks' YAMLs say
    where their data is."""
    for name in tasks:
        if name not in TABLE2_YAMLS:
            continue
        files = sorted((data_dir / name).glob("*.jsonl")) if (data_dir / name).is_dir() else []
        if not files:
            raise EvaluateError(
                f"--data-dir {data_dir}: no {name}/<split>.jsonl (expected e.g. {data_dir / name / 'test.jsonl'}; "
                "write it with --download-data on a networked machine)"
            )
        split = files[0].stem
        lines = [
            f"include: {json.dumps(str(_lm_eval_tasks_dir() / TABLE2_YAMLS[name]))}",
            f"task: {name}",
            "tag: null",
            "dataset_path: json",
            "dataset_name: null",
            f"dataset_kwargs: {{data_files: {{{split}: {json.dumps(str(files[0].resolve()))}}}}}",
            "training_split: null",
            f"validation_split: {split if split == 'validation' else 'null'}",
            f"test_split: {split if split == 'test' else 'null'}",
            "fewshot_split: null",
        ]
        (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def download_data(tasks: list[str], data_dir: Path, task_manager) -> None:
    """One-time, on a networked machine: each task's evaluation split as DIR/<task>/<split>.jsonl."""
    from lm_eval.tasks import get_task_dict

    for name, task in get_task_dict(tasks, task_manager).items():
        split = eval_split(task)
        docs = task.dataset[task.config.test_split if split == "test" else task.config.validation_split]
        (data_dir / name).mkdir(parents=True, exist_ok=True)
        docs.to_json(str(data_dir / name / f"{split}.jsonl"), lines=True, force_ascii=False)
        print(f"wrote {data_dir / name / f'{split}.jsonl'} ({len(docs)} documents)")


def task_manager_for(tasks: list[str], include: list[str]):
    """lm-eval's TaskManager: over the Table 2 folders and the include paths when that finds every task,
    else over all of lm-eval's tasks. Raises for a name neither knows."""
    from lm_eval.tasks import TaskManager

    folders = sorted({str(_lm_eval_tasks_dir() / Path(TABLE2_YAMLS[t]).parent) for t in tasks if t in TABLE2_YAMLS})
    quick = TaskManager(include_defaults=False, include_path=[*folders, *include] or None)
    if all(t in quick.all_tasks for t in tasks):
        return quick
    full = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in full.all_tasks]
    if unknown:
        raise EvaluateError(
            f"--tasks: unknown task {unknown[0]!r} (lm-eval's names, 'table2', or tasks under --include_path)"
        )
    return full


def table(results: dict, router: str | None, paper_config: bool) -> str:
    def cell(task):
        value = results.get(task, {}).get(f"{METRIC},none")
        return f"{100 * value:.2f}" if isinstance(value, float) else "-"

    out = []
    if any(t in results for t in TABLE2_TASKS):
        out = _table2_rows(results, router, paper_config, cell)
    others = [t for t in results if t not in TABLE2_TASKS]
    for task in others:
        metrics = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in results[task].items()
                            if isinstance(v, float) and not k.split(",")[0].endswith("_stderr"))
        out.append(f"{task}: {metrics}")
    return "\n".join(out)


def _table2_rows(results: dict, router: str | None, paper_config: bool, cell) -> list[str]:
    rows = [["this run", *[cell(t) for t in TABLE2_TASKS]]]
    present = [results[t][f"{METRIC},none"] for t in TABLE2_TASKS if f"{METRIC},none" in results.get(t, {})]
    rows[0].append(f"{100 * sum(present) / len(present):.2f}" if len(present) == len(TABLE2_TASKS) else "-")
    paper = get_router(router).paper_table2 if paper_config and router in router_names() else None
    if paper is not None:  # the paper's row for this router (Table 2: 182M, E = 8, k = 1, 30B tokens)
        rows.append([paper.label, *[f"{v:.2f}" for v in paper.accuracies], f"{paper.average:.2f}"])
    header = ["model", *TABLE2_HEADERS, "Avg"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def is_paper_config(job: dict) -> bool:
    moe = job.get("moe", {})
    return (job.get("model", {}).get("flavor") == "182M" and moe.get("num_experts") == 8
            and moe.get("top_k") == 1 and moe.get("granularity") == 1 and moe.get("ffn_expansion") == 1)


def write_tensorboard(run_dir: Path, job: dict, step: int, results: dict) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    log_dir = run_dir / job.get("metrics", {}).get("save_tb_folder", "tb") / "eval"
    writer = SummaryWriter(str(log_dir))
    values = []
    for task, metrics in results.items():
        value = metrics.get(f"{METRIC},none")
        if isinstance(value, float):
            writer.add_scalar(f"eval/{task}", value, step)
            if task in TABLE2_TASKS:
                values.append(value)
    if len(values) == len(TABLE2_TASKS):
        writer.add_scalar("eval/table2_avg", sum(values) / len(values), step)
    writer.close()
    return log_dir


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def run(a) -> dict:
    if a.data_dir:  # read at import: no hub look-ups for local files
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    tasks = expand_tasks(a.tasks)
    include = [str(Path(p)) for p in (a.include_path or [])]
    for path in include:
        if not Path(path).is_dir():
            raise EvaluateError(f"--include_path {path}: no such folder")
    if a.download_data:
        download_data(tasks, Path(a.download_data), task_manager_for(tasks, include))
        return {}
    if a.checkpoint:
        from remoe_recipe.load_checkpoint import find_step_dir

        find_step_dir(a.checkpoint, a.step)  # a wrong path or step fails before the task index is built
    with tempfile.TemporaryDirectory() as local:
        if a.data_dir:
            if not Path(a.data_dir).is_dir():
                raise EvaluateError(f"--data-dir {a.data_dir}: no such folder")
            local_task_yamls(tasks, Path(a.data_dir), Path(local))
            include = [*include, local]
        task_manager = task_manager_for(tasks, include)
        run_dir, job, step, lm = None, {}, None, None
        if a.checkpoint:
            from remoe_recipe.lm_eval_model import RecipeLM
            from remoe_recipe.load_checkpoint import load_trained_model

            trained = load_trained_model(a.checkpoint, a.step, a.config, a.overrides, a.tokenizer, device=a.device)
            lm = RecipeLM(trained.model, trained.tokenizer, trained.args.max_seq_len, a.batch_size, a.device)
            run_dir, job, step = trained.run_dir, trained.job, trained.step
        else:
            from lm_eval.models.huggingface import HFLM

            if not (Path(a.hf) / "config.json").is_file():
                raise EvaluateError(f"--hf {a.hf}: no config.json (expected a folder written by remoe_recipe.export)")
            lm = HFLM(pretrained=a.hf, trust_remote_code=True, dtype="float32", batch_size=a.batch_size,
                      device=a.device)
        try:
            output = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=0, limit=a.limit, task_manager=task_manager,
                log_samples=a.log_samples, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                torch_random_seed=0, fewshot_random_seed=0,
            )
        except (FileNotFoundError, ConnectionError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvaluateError(
                f"--tasks {','.join(tasks)}: task data could not be read ({first}); offline, pass --data-dir "
                "(see --download-data)"
            ) from None
    results = output["results"]
    router = job.get("moe", {}).get("router") if job else None
    print(table(results, router, is_paper_config(job) if job else False))
    target = Path(a.output) if a.output else None
    if target is None:
        base = run_dir / "eval" if run_dir else Path(a.hf) / "eval"
        target = base / (f"step-{step}.json" if step is not None else "results.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(a.checkpoint or a.hf), "step": step, "metric": METRIC, "results": results,
              "n_samples": output.get("n-samples"), "config": output.get("config")}
    if a.log_samples:
        record["samples"] = output.get("samples")
    target.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    print(f"wrote {target}")
    if run_dir is not None and step is not None:
        print(f"TensorBoard scalars eval/<task> at step {step} in {write_tensorboard(run_dir, job, step, results)}")
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="RUN/checkpoint (latest step, or --step) or a step folder")
    source.add_argument("--hf", help="a folder written by remoe_recipe.export")
    source.add_argument("--download-data", metavar="DIR", help="write the tasks' data to DIR (networked machine)")
    p.add_argument("--step", type=int)
    p.add_argument("--tasks", default="table2", help="comma-separated lm-eval task names; 'table2' = the paper's seven")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1), as lm-eval's --limit")
    p.add_argument("--include_path", "--include-path", action="append", help="a folder of your own task YAMLs")
    p.add_argument("--data-dir", help="local task data: DIR/<task>/<split>.jsonl (from --download-data)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", help="the JSON file (default: RUN/eval/step-N.json)")
    p.add_argument("--log-samples", action="store_true", help="keep every request's log-likelihoods in the JSON")
    p.add_argument("--config", help="the run's TOML, for runs without RUN/job_config.json (overrides after --)")
    p.add_argument("--tokenizer", help="the run's tokenizer, if not where the run had it")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.limit is not None and a.limit >= 1:
        a.limit = int(a.limit)
    from remoe_recipe.load_checkpoint import CheckpointError

    try:
        run(a)
    except (EvaluateError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
