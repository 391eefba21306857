"""The recipe's tiktoken tokenizer as Hugging Face tokenizer files (tokenizer.json & co.), offline.

tiktoken stores only byte-sequence ranks; a `tokenizers` BPE needs merges. GPT-2-style ranks are a
merge order: a token of rank r is the merge of the two parts that BPE with ranks < r leaves of its
bytes. Pre-tokenization is the recipe's GPT-2 split regex followed by byte-level mapping (no prefix
space), so ids match `TiktokenTokenizer.encode` exactly. `<|endoftext|>` is EOS (and BOS/UNK, as in
GPT-2's HF tokenizer).
"""

import json
from pathlib import Path

from remoe_recipe.data.tokenizer import ENDOFTEXT, GPT2_PAT_STR, TiktokenTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenization uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token` using only ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(tokenizer: TiktokenTokenizer):
    """A transformers PreTrainedTokenizerFast equivalent to the recipe tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    encoding = tokenizer.encoding
    ranks = encoding._mergeable_ranks
    to_char = bytes_to_unicode()
    text = lambda b: "".join(to_char[x] for x in b)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([ENDOFTEXT])
    if bpe.token_to_id(ENDOFTEXT) != tokenizer.eos_id:
        raise ValueError(f"{ENDOFTEXT} got id {bpe.token_to_id(ENDOFTEXT)}, the recipe uses {tokenizer.eos_id}")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        model_max_length=int(1e30), clean_up_tokenization_spaces=False,
    )


def save_hf_tokenizer(tokenizer: TiktokenTokenizer, out: str | Path, model_max_length: int | None = None) -> None:
    hf = hf_tokenizer(tokenizer)
    if model_max_length:
        hf.model_max_length = model_max_length
    hf.save_pretrained(str(out))
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; this class both read.
    path = Path(out) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
