"""config.json and generation_config.json of an exported model.

Dense runs are exactly transformers' LlamaForCausalLM (no remote code). ReLU and TopK runs use the
remote code (the routers whose spec says `hf_remote_code`) shipped beside the weights (configuration_remoe.py / modeling_remoe.py, `auto_map`).
Both write `rope_theta` (transformers 4.x) and `rope_parameters` (5.x): 4.57 and 5.24 load the same folder
to the same logits.
"""

import json
import shutil
from pathlib import Path

from remoe_recipe.config import ConfigError
from remoe_recipe.data.tokenizer import TiktokenTokenizer
from remoe_recipe.model import ReMoEModelArgs
from remoe_recipe.routers import get_router, router_names

REMOTE_CODE = ("configuration_remoe.py", "modeling_remoe.py")
_HERE = Path(__file__).parent


def hf_export_problem(router: str) -> str | None:
    """Why a run with this router cannot be exported to Hugging Face, or None."""
    if get_router(router).hf_remote_code:
        return None
    supported = [name for name in router_names() if get_router(name).hf_remote_code]
    return (
        f"moe.router = {router!r}: the Hugging Face export (remote code hf/modeling_remoe.py) implements "
        f"{', '.join(supported)}; evaluate and generate this run with the recipe's own model instead"
    )


def hf_config_dict(args: ReMoEModelArgs, tokenizer: TiktokenTokenizer, dtype: str) -> dict:
    if problem := hf_export_problem(args.moe.router):
        raise ConfigError(problem)
    common = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.eos_id,  # GPT-2 convention: <|endoftext|> is both
        "eos_token_id": tokenizer.eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": False,
    }
    if not args.is_moe:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "intermediate_size": args.dense_ffn_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            **common,
        }
    return {
        "architectures": ["ReMoEForCausalLM"],
        "model_type": "remoe",
        "auto_map": {
            "AutoConfig": "configuration_remoe.ReMoEConfig",
            "AutoModelForCausalLM": "modeling_remoe.ReMoEForCausalLM",
        },
        "router": args.moe.router,
        "num_experts": args.num_routed_experts,
        "num_experts_per_tok": args.routed_top_k,
        "moe_intermediate_size": args.expert_dim,
        **common,
    }


def generation_config_dict(tokenizer: TiktokenTokenizer) -> dict:
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "do_sample": False, "use_cache": False}


def copy_remote_code(out: Path) -> None:
    for name in REMOTE_CODE:
        shutil.copyfile(_HERE / name, out / name)


def write_hf_metadata(out: Path, args: ReMoEModelArgs, tokenizer: TiktokenTokenizer, dtype: str) -> None:
    """Everything of an HF model folder except the weights: configs, tokenizer files, remote code."""
    from remoe_recipe.hf.tokenizer import save_hf_tokenizer

    (out / "config.json").write_text(json.dumps(hf_config_dict(args, tokenizer, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_dict(tokenizer), indent=2) + "\n")
    save_hf_tokenizer(tokenizer, out, model_max_length=args.max_seq_len)
    if args.is_moe:
        copy_remote_code(out)


def complete_last_hf_save(job_config, model_args: ReMoEModelArgs, step: int) -> Path | None:
    """After torchtitan's `--checkpoint.last_save_in_hf` wrote the weights into checkpoint/step-N, add
    the rest of the folder so transformers loads it as the exporter's output. Returns the folder."""
    out = Path(job_config.job.dump_folder) / job_config.checkpoint.folder / f"step-{step}"
    if not (out / "model.safetensors.index.json").is_file():
        return None
    from torchtitan.tools.logging import logger

    from remoe_recipe.data.tokenizer import build_tiktoken_tokenizer

    try:
        write_hf_metadata(out, model_args, build_tiktoken_tokenizer(job_config), job_config.checkpoint.export_dtype)
    except ImportError as e:
        logger.warning(f"{out}: weights only ({e}); pip install -e \".[eval]\" or run python -m remoe_recipe.export")
        return None
    logger.info(f"{out}: a Hugging Face folder (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
    return out
