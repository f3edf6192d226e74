"""Batched generation with per-request decoding parameters.

transformers' `generate` takes one GenerationConfig per call, but a batch mixes
requests with their own temperature, top-p/k, penalties, lengths, stops and
seeds. This loop runs the model once per token for the whole batch (left
padding, attention mask, KV cache) and decodes each row its own way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from kubelm_contract.protocol import Decoding

from ..train.precision import cpu_has_fast_bf16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    prompt: str
    decoding: Decoding


@dataclass(frozen=True)
class Output:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


class Engine:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.device = device
        self.eos = tokenizer.eos_token_id

    @classmethod
    def load(cls, reference: str, revision: str | None = None, tokenizer_reference: str | None = None,
             device: str = "auto", dtype: str = "auto") -> Engine:
        from ..models import load_causal_lm, load_tokenizer

        target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              ("cpu" if device == "auto" else device))
        chosen = pick_dtype(dtype, target)
        started = time.perf_counter()
        model = load_causal_lm(reference, revision, dtype=chosen).to(target)
        tokenizer = load_tokenizer(tokenizer_reference or reference, None if tokenizer_reference else revision)
        log.info("loaded %s (%s, %s) in %.1fs", reference, target, chosen, time.perf_counter() - started)
        return cls(model, tokenizer, target)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def generate(self, items: list[Item]) -> list[Output]:
        tokenizer, model = self.tokenizer, self.model
        encoded = tokenizer([i.prompt for i in items], return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids = encoded["input_ids"].to(self.device)
        attention = encoded["attention_mask"].to(self.device)
        if input_ids.shape[1] == 0:  # every prompt empty: start from EOS, as GPT-2 does for unconditional text
            input_ids = torch.full((len(items), 1), self.eos, device=self.device)
            attention = torch.ones_like(input_ids)
        prompt_tokens = attention.sum(dim=1).tolist()
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        generators = [self._generator(i.decoding) for i in items]
        limit = max(i.decoding.max_new_tokens for i in items)
        generated: list[list[int]] = [[] for _ in items]
        finish: list[str | None] = [None] * len(items)

        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        for _ in range(limit):
            tokens = self._select(logits, items, generated, input_ids, generators)
            for row, token in enumerate(tokens.tolist()):
                if finish[row] is not None:
                    continue
                if token == self.eos:
                    finish[row] = "stop"
                    continue
                generated[row].append(token)
                decoding = items[row].decoding
                if decoding.stop and self._hit_stop(generated[row], decoding.stop):
                    finish[row] = "stop"
                elif len(generated[row]) >= decoding.max_new_tokens:
                    finish[row] = "length"
            if all(f is not None for f in finish):
                break
            attention = torch.cat([attention, attention.new_ones((len(items), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()

        results = []
        for row, item in enumerate(items):
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            text = self._cut_at_stop(text, item.decoding.stop)
            results.append(Output(text, finish[row] or "length", int(prompt_tokens[row]), len(generated[row])))
        return results

    def _generator(self, decoding: Decoding) -> torch.Generator | None:
        if decoding.seed is None or decoding.temperature == 0:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(decoding.seed)
        return generator

    def _hit_stop(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(tokens[-32:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    @staticmethod
    def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
        cuts = [text.find(s) for s in stops if s in text]
        return text[:min(cuts)] if cuts else text

    def _select(self, logits: torch.Tensor, items: list[Item], generated: list[list[int]],
                prompts: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Next token per row: repetition penalty, then greedy or temperature / top-k / top-p sampling."""
        for row, item in enumerate(items):
            penalty = item.decoding.repetition_penalty
            if penalty != 1.0:
                seen = torch.cat([prompts[row], torch.tensor(generated[row], dtype=prompts.dtype,
                                                             device=prompts.device)]).unique()
                values = logits[row, seen]
                logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
        chosen = logits.argmax(dim=-1)
        sampling = [r for r, i in enumerate(items) if i.decoding.temperature > 0]
        if not sampling:
            return chosen
        rows = torch.tensor(sampling, device=logits.device)
        temps = torch.tensor([items[r].decoding.temperature for r in sampling], device=logits.device)
        scores = logits[rows] / temps[:, None]
        for j, r in enumerate(sampling):
            k = items[r].decoding.top_k
            if 0 < k < scores.shape[1]:
                kth = torch.topk(scores[j], k).values[-1]
                scores[j] = scores[j].masked_fill(scores[j] < kth, float("-inf"))
        top_p = torch.tensor([items[r].decoding.top_p for r in sampling], device=logits.device)
        if (top_p < 1.0).any():
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Drop tokens once the mass before them already reaches top_p (the first always stays).
            drop = (cumulative - sorted_scores.softmax(dim=-1)) >= top_p[:, None]
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)
        probabilities = scores.softmax(dim=-1)
        for j, r in enumerate(sampling):
            chosen[r] = torch.multinomial(probabilities[j], 1, generator=generators[r])[0]
        return chosen
