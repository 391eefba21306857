"""The recipe's model inside lm-evaluation-harness: a `TemplateLM` over a DCP checkpoint's model.

No export needed; runs on CPU or GPU, batched. Log-likelihoods: each request's context + continuation
(left-truncated to the model's context length) in one forward pass; requests are sorted by length so a
batch pads little (right padding: causal attention and per-token routing leave the real positions
unchanged). Generation (`generate_until`) is greedy, as lm-eval's own HF model does by default.
"""

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM

from remoe_recipe.data.tokenizer import TiktokenTokenizer


class RecipeLM(TemplateLM):
    def __init__(self, model: torch.nn.Module, tokenizer: TiktokenTokenizer, max_length: int,
                 batch_size: int = 16, device: torch.device | str = "cpu"):
        super().__init__()
        self.model = model.eval()
        self.tokenizer_recipe = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_recipe.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_recipe.encoding.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer_recipe.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_recipe.decode(tokens)

    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-probabilities [batch, max_len, vocab] for right-padded rows."""
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return F.log_softmax(self.model(batch.to(self.device)).float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            # The model sees at most max_length tokens; the last one is only predicted.
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            prepared.append((i, whole, min(len(continuation_enc), len(whole) - 1)))
        prepared.sort(key=lambda p: -len(p[1]))
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start:start + self.batch_size]
            logprobs = self._logits([whole[:-1] for _, whole, _ in chunk]).cpu()
            for row, (i, whole, n_cont) in enumerate(chunk):
                targets = torch.tensor(whole[-n_cont:])
                # position t predicts token t + 1
                scores = logprobs[row, len(whole) - 1 - n_cont:len(whole) - 1]
                total = scores.gather(-1, targets[:, None]).sum().item()
                greedy = bool((scores.argmax(-1) == targets).all())
                results[i] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from remoe_recipe.generate import generate_tokens

        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-self.max_length:]
            text = ""
            for token in generate_tokens(self.model, prompt, max_new, self.max_length, eos_id=self.eot_token_id,
                                         device=self.device, vocab_size=self.tokenizer_recipe.get_vocab_size()):
                text += self.tok_decode([token])
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
