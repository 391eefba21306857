"""The dense baseline: no router and no experts; every block has one SwiGLU FFN of width
moe.ffn_expansion × ffn (the paper's Dense, and Dense×8 with ffn_expansion = 8, Fig. 6c)."""

from remoe_recipe.routers.registry import PaperRow, RouterSpec, register_router


def _check(moe) -> list[str]:
    return [] if moe.ffn_expansion >= 1 else [f"moe.ffn_expansion = {moe.ffn_expansion}: expected >= 1"]


SPEC = register_router(RouterSpec(
    name="dense",
    summary="no experts: one SwiGLU FFN of width moe.ffn_expansion x ffn per block (the paper's Dense)",
    build=None,
    config_keys=("ffn_expansion",),
    check=_check,
    paper_table2=PaperRow("Dense (paper)", (19.45, 43.35, 54.40, 28.61, 31.09, 61.97, 28.52), 38.20),
    hf_remote_code=True,
))
