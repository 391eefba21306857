"""tiktoken-backed tokenizers behind torchtitan's BaseTokenizer interface.

`model.tokenizer_path` picks one:
  * "builtin" (or empty): the 4096-token byte-level BPE trained on the built-in corpus;
  * a path to a `*.tiktoken` ranks file (e.g. GPT-2's r50k_base.tiktoken): GPT-2 split regex
    and `<|endoftext|>` = number of ranks, which is exactly how GPT-2's vocabulary is laid out;
  * a tiktoken encoding name ("gpt2", "cl100k_base", ...): tiktoken.get_encoding, which
    downloads on first use unless TIKTOKEN_CACHE_DIR already holds the files.
"""

import base64
import binascii
import os
from pathlib import Path

import tiktoken
from torchtitan.components.tokenizer import BaseTokenizer

ENDOFTEXT = "<|endoftext|>"
BUILTIN_TOKENIZER = Path(__file__).parent / "builtin" / "shakespeare_bpe4096.tiktoken"
# GPT-2's pre-tokenization regex as tiktoken writes it (tiktoken_ext.openai_public.r50k_pat_str);
# equivalent to the original GPT-2 / `tokenizers` ByteLevel regex.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
TOKENIZER_KEY = "model.tokenizer_path"


class TiktokenTokenizer(BaseTokenizer):
    """A tiktoken Encoding with EOS = `<|endoftext|>` and no BOS (GPT-2 convention)."""

    def __init__(self, encoding: tiktoken.Encoding):
        super().__init__()
        self.encoding = encoding
        self.eos_id: int = encoding.eot_token
        self.bos_id = None
        self.n_words: int = encoding.n_vocab

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # encode_ordinary: "<|endoftext|>" written inside a document is plain text, never EOS.
        ids = self.encoding.encode_ordinary(text)
        # add_bos is accepted for torchtitan compatibility; there is no BOS token to add.
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.encoding.decode(list(ids))

    def get_vocab_size(self) -> int:
        return self.n_words


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `*.tiktoken` file ("base64(token) rank" per line).

    Same format as tiktoken.load.load_tiktoken_bpe, read directly because that function caches
    local files by path in a temp directory and would serve a stale copy after the file changes.
    """
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{TOKENIZER_KEY} = {str(path)!r}: line {line_no} is not 'base64-token rank' "
                    f"({line[:60]!r}); is this a tiktoken ranks file?"
                ) from None
    return ranks


def encoding_from_file(path: str | os.PathLike, name: str | None = None) -> tiktoken.Encoding:
    ranks = read_tiktoken_ranks(path)
    if not ranks:
        raise ValueError(f"{TOKENIZER_KEY} = {str(path)!r}: no tokens in file")
    n = max(ranks.values()) + 1  # = len(ranks) for a well-formed file (ranks 0..n-1)
    return tiktoken.Encoding(
        name or Path(path).stem,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: n},
    )


def names_a_file(spec: str) -> bool:
    """model.tokenizer_path names a ranks file (rather than "builtin" or a tiktoken encoding name)."""
    return "/" in spec or os.sep in spec or spec.endswith(".tiktoken") or os.path.isfile(spec)


def load_tokenizer(spec: str | None = "builtin") -> TiktokenTokenizer:
    """Tokenizer for "builtin", a `*.tiktoken` path, or a tiktoken encoding name."""
    if not spec or spec == "builtin":
        return TiktokenTokenizer(encoding_from_file(BUILTIN_TOKENIZER, "shakespeare_bpe4096"))
    if names_a_file(spec):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"{TOKENIZER_KEY} = {spec!r}: no such file")
        return TiktokenTokenizer(encoding_from_file(spec))
    try:
        encoding = tiktoken.get_encoding(spec)
    except Exception as e:
        raise RuntimeError(
            f"{TOKENIZER_KEY} = {spec!r}: could not load tiktoken encoding {spec!r} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
            f"Known names: {tiktoken.list_encoding_names()}. tiktoken downloads encodings on "
            "first use; offline, set TIKTOKEN_CACHE_DIR to a filled cache or pass a ranks file, "
            "e.g. --model.tokenizer_path path/to/gpt2.tiktoken (r50k_base.tiktoken), or use "
            "--model.tokenizer_path builtin."
        ) from e
    return TiktokenTokenizer(encoding)


def build_tiktoken_tokenizer(job_config) -> TiktokenTokenizer:
    """torchtitan TrainSpec.build_tokenizer_fn: `model.tokenizer_path`, default "builtin"."""
    return load_tokenizer(getattr(job_config.model, "tokenizer_path", None) or "builtin")
