# remoe-recipe for GPU clusters: CUDA PyTorch, the recipe, and the GPT-2 BPE file (runs need no network).
#   docker build -t remoe-recipe .
#   docker run --gpus all --shm-size 16g -v "$PWD/outputs:/workspace/remoe/outputs" -p 6006:6006 \
#       remoe-recipe train_configs/paper_182M_remoe.toml [--section.key value ...]
# The base image pins torch (2.10, CUDA 12.8); the package's own dependency list (pyproject.toml) is
# installed on top of it exactly as the README does after its explicit torch install.
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

# TIKTOKEN_CACHE_DIR is a cache path, not a secret ("TOKEN" in its name trips DL3064).
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken

RUN useradd --create-home --uid 1000 remoe
WORKDIR /workspace/remoe

COPY --chown=remoe:remoe pyproject.toml README.md ./
COPY --chown=remoe:remoe remoe_recipe ./remoe_recipe
COPY --chown=remoe:remoe train_configs ./train_configs
COPY --chown=remoe:remoe scripts ./scripts

# Same install path as the README (torch is already in the base image, so pip keeps it).
RUN pip install . \
    && python -c "import tiktoken; tiktoken.get_encoding('gpt2')" \
    && chmod -R a+rX "$TIKTOKEN_CACHE_DIR" \
    && mkdir -p outputs && chown remoe:remoe outputs

USER 1000
# TensorBoard: docker exec -it <container> tensorboard --logdir outputs --bind_all
EXPOSE 6006
ENTRYPOINT ["scripts/train.sh"]
CMD ["train_configs/debug_remoe.toml"]
