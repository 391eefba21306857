from .args import ParamCounts, ReMoEModelArgs, padded_vocab_size, remoe_flavors
from .model import ReMoETransformer
from .moe import MoE, RouterRecord

__all__ = [
    "MoE",
    "ParamCounts",
    "ReMoEModelArgs",
    "ReMoETransformer",
    "RouterRecord",
    "padded_vocab_size",
    "remoe_flavors",
]
