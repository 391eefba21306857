"""ReMoE pretraining recipe on torchtitan 0.2.2.

Importing the package registers the torchtitan train spec `remoe`; nothing else happens on import.
"""

from torchtitan.protocols.train_spec import register_train_spec

from remoe_recipe.spec import build_train_spec

register_train_spec("remoe", build_train_spec())
