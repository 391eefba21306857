"""Export a recipe checkpoint as a Hugging Face model folder.

    python -m remoe_recipe.export --checkpoint outputs/debug_remoe/checkpoint [--step N] --out hf/debug_remoe

Writes config.json, safetensors weights (sharded past --max-shard-size, with model.safetensors.index.json),
generation_config.json, the tokenizer files and, for the ReLU and TopK routers, the remote code that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads. A dense run is a plain
LlamaForCausalLM. Weights are written tensor by tensor from the loaded model: at most one shard is held
besides it. The export is checked against the exported architecture's parameter names and shapes.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from remoe_recipe.hf.convert import iter_to_hf
from remoe_recipe.hf.hf_config import hf_export_problem, write_hf_metadata
from remoe_recipe.load_checkpoint import CheckpointError, TrainedModel, load_trained_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    pass


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * scale)
    if upper.isdigit():
        return int(upper)
    raise ExportError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or a byte count")


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder; choose a new folder")


def write_safetensors(tensors, out: Path, max_shard_bytes: int, dtype: torch.dtype) -> dict[str, tuple]:
    """Write (name, tensor) pairs into shards; returns {name: shape}."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    shapes: dict[str, tuple] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            save_file(current, str(out / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, tensor in tensors:
        tensor = tensor.detach().to(dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.clone() if tensor.untyped_storage().nbytes() != nbytes else tensor
        shapes[name] = tuple(tensor.shape)
        size += nbytes
        total += nbytes
    flush()
    umask = os.umask(0)
    os.umask(umask)
    for i in range(len(shards)):  # safetensors writes through a private temporary file (mode 600)
        os.chmod(out / f"shard-{i:05d}.tmp", 0o666 & ~umask)
    if len(shards) == 1:
        (out / "shard-00000.tmp").rename(out / "model.safetensors")
        return shapes
    weight_map = {}
    for i, names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i:05d}.tmp").rename(out / filename)
        weight_map.update({n: filename for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return shapes


def check_against_architecture(out: Path, written: dict[str, tuple]) -> None:
    """The exported class, built on the meta device from the written config, must expect exactly the
    written tensors: a name transformers does not expect would load as random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{out}: written tensors do not match {type(model).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    for name, shape in written.items():
        if expected[name] != shape:
            raise ExportError(f"{out}: {name} is {list(shape)}, {type(model).__name__} expects {list(expected[name])}")


def export(trained: TrainedModel, out: str | Path, dtype: str = "float32", max_shard_size: str = "5GB",
           verify: bool = True) -> Path:
    out = Path(out)
    check_out_dir(out)
    if problem := hf_export_problem(trained.args.moe.router):
        raise ExportError(problem)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {sorted(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        written = write_safetensors(iter_to_hf(trained.model.state_dict(), trained.args), out, max_bytes, DTYPES[dtype])
    write_hf_metadata(out, trained.args, trained.tokenizer, dtype)
    if verify:
        check_against_architecture(out, written)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint (latest step, or --step) or RUN/checkpoint/step-N")
    p.add_argument("--step", type=int, help="the step to export (default: the latest)")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the Hugging Face model")
    p.add_argument("--config", help="the run's TOML, for runs without RUN/job_config.json (overrides after --)")
    p.add_argument("--tokenizer", help="the run's tokenizer (model.tokenizer_path), if not where the run had it")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype (checkpoints are fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="split the safetensors past this size (default 5GB)")
    p.add_argument("overrides", nargs="*", help="the run's --section.key value overrides, after --")
    a = p.parse_args(argv)
    try:
        check_out_dir(Path(a.out))
        trained = load_trained_model(a.checkpoint, a.step, a.config, a.overrides, a.tokenizer)
        out = export(trained, a.out, a.dtype, a.max_shard_size)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    kind = "LlamaForCausalLM" if not trained.args.is_moe else f"ReMoEForCausalLM (router {trained.args.moe.router}, remote code)"
    print(f"exported {trained.step_dir} as {kind} to {out}")


if __name__ == "__main__":
    main()
