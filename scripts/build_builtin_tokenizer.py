"""Train the built-in byte-level BPE tokenizer and write it in tiktoken's file format.

Usage:
    python scripts/build_builtin_tokenizer.py [--vocab-size 4096]

Trains a GPT-2-style byte-level BPE with the `tokenizers` library on the training split of the
built-in Shakespeare corpus, then converts it to tiktoken's format (one "base64(token) rank" line
per token). Ranks are the 256 single bytes in byte order followed by the merged tokens in merge
order, so tiktoken's lowest-rank-first merging replays the trained merges. `<|endoftext|>` is
not in the file: the loader appends it with id = number of ranks, as GPT-2 does.

The script checks the conversion before writing: every merge must yield a new token, and
tiktoken must tokenize the whole corpus (train and validation) into the same byte pieces as
the `tokenizers` model, and round-trip it.
"""

import argparse
import base64
import gzip
import json
import sys
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "remoe_recipe/data/builtin"
sys.path.insert(0, str(ROOT))
from remoe_recipe.data.tokenizer import ENDOFTEXT, GPT2_PAT_STR  # noqa: E402
from remoe_recipe.hf.tokenizer import bytes_to_unicode  # noqa: E402


def read_docs(corpus: Path, split: str) -> list[str]:
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        return [d["text"] for d in map(json.loads, f) if d["split"] == split]


def train_hf(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Same split regex as GPT-2 (use_regex=True), no prefix space: matches tiktoken's pat_str.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # includes the special token
        min_frequency=2,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_ranks(tok: Tokenizer) -> dict[bytes, int]:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    merges = json.loads(tok.to_str())["model"]["merges"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(byte_of[c] for c in left + right)
        if token in ranks:
            raise ValueError(f"two merges produce {token!r}: tiktoken ranks would differ")
        ranks[token] = len(ranks)
    return ranks


def check(tok: Tokenizer, enc: tiktoken.Encoding, texts: list[str]) -> None:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for text in texts:
        hf_pieces = [bytes(byte_of[c] for c in t) for t in tok.encode(text).tokens]
        tt_ids = enc.encode_ordinary(text)
        tt_pieces = [enc.decode_single_token_bytes(i) for i in tt_ids]
        if hf_pieces != tt_pieces:
            raise AssertionError(f"tokenizations differ on: {text[:80]!r}")
        if enc.decode(tt_ids) != text:
            raise AssertionError(f"round trip failed on: {text[:80]!r}")


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> None:
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=BUILTIN / "shakespeare.jsonl.gz")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or BUILTIN / f"shakespeare_bpe{args.vocab_size}.tiktoken"

    train, val = read_docs(args.corpus, "train"), read_docs(args.corpus, "validation")
    tok = train_hf(train, args.vocab_size)
    ranks = to_ranks(tok)
    enc = tiktoken.Encoding(
        "check", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)}
    )
    assert enc.n_vocab == args.vocab_size == tok.get_vocab_size(), (enc.n_vocab, tok.get_vocab_size())
    check(tok, enc, train + val + ["Unicode: naïve café — 東京 🙂, tabs\tand  spaces\n\n\n"])
    write_tiktoken(ranks, out)

    n_chars = {s: sum(map(len, d)) for s, d in (("train", train), ("validation", val))}
    n_tok = {s: sum(len(enc.encode_ordinary(t)) for t in d) for s, d in (("train", train), ("validation", val))}
    for s in n_chars:
        print(f"{s}: {n_tok[s]} tokens, {n_chars[s] / n_tok[s]:.2f} characters/token")
    print(f"wrote {out}: {len(ranks)} ranks + {ENDOFTEXT} = {enc.n_vocab} tokens")


if __name__ == "__main__":
    main()
