"""Validation loss through torchtitan's Validator, reading the recipe's own validation data."""

import contextlib

import torchtitan.components.validate as titan_validate
from torchtitan.components.validate import Validator

from remoe_recipe.data import build_validation_dataloader


@contextlib.contextmanager
def _recipe_validation_loader():
    # torchtitan 0.2.2's Validator.__init__ calls its module-level HF C4 loader builder by name;
    # swap in the recipe's builder (same signature) for the duration of that call only.
    original = titan_validate.build_text_validation_dataloader
    titan_validate.build_text_validation_dataloader = build_validation_dataloader
    try:
        yield
    finally:
        titan_validate.build_text_validation_dataloader = original


def build_validator(**kwargs) -> Validator:
    with _recipe_validation_loader():
        return Validator(**kwargs)
