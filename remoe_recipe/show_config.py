"""Print the recipe's own keys, or a run's fully resolved configuration.

    python -m remoe_recipe.show_config keys
        the recipe's TOML sections ([moe], [data]): every key, its default and what it means
    python -m remoe_recipe.show_config resolved --job.config_file train_configs/debug_remoe.toml [--section.key value ...]
        the complete configuration a run would use (defaults < TOML < command line), as TOML
"""

import ast
import dataclasses
import inspect
import json
import sys
import textwrap

from remoe_recipe import config as recipe_config
from remoe_recipe.routers import get_router, router_names


def field_docs(cls) -> dict[str, str]:
    """The string literal written under each dataclass field (how torchtitan documents its keys)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def format_keys() -> str:
    lines = []
    for section in dataclasses.fields(recipe_config.JobConfig):
        cls = section.default_factory
        docs = field_docs(cls)
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            # an unset default has no TOML value (TOML has no null): the key is simply left out
            lines.append(f"# {f.name} is unset" if default is None else f"{f.name} = {_toml_value(default)}")
            if f.name in docs:
                lines += [f"    # {line}" for line in textwrap.wrap(docs[f.name], 96)]
        if section.name == "moe":
            lines.append("# moe.router: the registered routers (remoe_recipe/routers)")
            for name in router_names():
                spec = get_router(name)
                keys = f" [keys: {', '.join(spec.config_keys)}]" if spec.config_keys else ""
                lines += [f"#   {line}" for line in textwrap.wrap(f"{name}: {spec.summary}{keys}", 96)]
        lines.append("")
    return "\n".join(lines)


def format_resolved(config) -> str:
    lines = []

    def section(prefix: str, obj) -> None:
        nested = []
        lines.append(f"[{prefix}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{prefix}.{f.name}", value))
            elif value is None:
                lines.append(f"# {f.name} is unset")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
        for name, value in nested:
            section(name, value)

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            section(f.name, value)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("keys", "resolved"):
        raise SystemExit(__doc__)
    if argv[0] == "keys":
        print(format_keys())
        return
    from remoe_recipe.config import ConfigError
    from remoe_recipe.preflight import load_config

    try:
        print(format_resolved(load_config(argv[1:])))
    except ConfigError as e:
        raise SystemExit("\n".join(e.lines())) from None


if __name__ == "__main__":
    main()
