"""The `remoe` torchtitan train spec: the model family and the components it trains with."""

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.protocols.train_spec import TrainSpec

from remoe_recipe.data import build_dataloader, build_tiktoken_tokenizer
from remoe_recipe.evaluation import build_validator
from remoe_recipe.hf.convert import ReMoEStateDictAdapter
from remoe_recipe.infra.parallelize import parallelize_remoe
from remoe_recipe.model import ReMoETransformer, remoe_flavors
from remoe_recipe.optim import build_remoe_lr_schedulers, build_remoe_optimizers


def build_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=ReMoETransformer,
        model_args=remoe_flavors(),
        parallelize_fn=parallelize_remoe,
        pipelining_fn=None,
        build_optimizers_fn=build_remoe_optimizers,
        build_lr_schedulers_fn=build_remoe_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tiktoken_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        # --checkpoint.last_save_in_hf / initial_load_in_hf: the exporter's own mapping
        state_dict_adapter=ReMoEStateDictAdapter,
    )
