"""Batched generation with per-request decoding parameters, rows joining and leaving as it runs.

transformers' `generate` takes one GenerationConfig per call and a fixed batch,
but a worker's batch mixes requests with their own temperature, top-p/k,
penalties, lengths, stops and seeds, and requests keep arriving. This loop runs
the model once per token for all rows (right-aligned with left padding, an
attention mask, explicit positions, a KV cache that grows in place), decodes
each row its own way, lets finished rows leave and prefills new ones into the
running batch between steps (continuous batching).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kubelm_contract.protocol import Decoding, TokenLogprob

from ..cpu import cpu_has_fast_bf16
from . import gpt2, packing, token_bytes
from .kvcache import GrowingCache
from .textstream import streamable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    prompt: str
    decoding: Decoding
    ids: tuple[int, ...] | None = None
    """The prompt's token ids (`Engine.encode`) when the caller already has them: not encoded again."""


@dataclass(frozen=True)
class Output:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # When the row's first token was chosen and when its last was (time.monotonic()); not part of what
    # the output is, so two runs of the same request compare equal.
    first_token_at: float | None = field(default=None, compare=False)
    finished_at: float | None = field(default=None, compare=False)
    logprobs: tuple[TokenLogprob, ...] | None = None
    """Per token of `text`, when its decoding asked for them."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """Per token of the prompt, when its decoding asked for them (the first has no log-probability)."""


@dataclass
class Row:
    key: Any
    """The caller's handle for this row, returned with its output."""
    item: Item
    prompt_ids: list[int]
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    finish: str | None = None
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when asked for: its text, log-probability and the most likely alternatives."""
    covered: int = 0
    """Tokens whose text lies wholly inside what may be streamed so far (rows with log-probabilities)."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Streamable:
    """What of an unfinished row may be sent now."""

    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    """Of the tokens whose text lies wholly inside `text`, when the row asked for log-probabilities."""


@dataclass
class Batch:
    """Rows being decoded together: their cache, attention mask (one column per cache column), the
    position of each row's next token and the logits its next token is chosen from."""
    rows: list[Row] = field(default_factory=list)
    cache: GrowingCache = field(default_factory=GrowingCache)
    attention: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    """Each row's token picked by `Engine.choose` and not yet run through the model (then logits is None)."""

    def __len__(self) -> int:
        return sum(1 for r in self.rows if r.finish is None)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


class Engine:
    """Continuous batching: `join` prefills new rows into a running batch between steps, `step` picks
    one token for every row, hands back the rows that finished and runs the model once for the rest."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, batch_hint: int = 32, lean: bool = True):
        # Measured before packing, which turns weights into buffers: what one decode step must read.
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.dtype = next(model.parameters()).dtype
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.eos = tokenizer.eos_token_id
        self.end_tokens = end_tokens(model, tokenizer)
        self.token_bytes = token_bytes.reader(tokenizer)
        """A row ends when it picks one of these (empty: rows run to their length, as benchmarks want)."""
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.lean = gpt2.build(self.model, batch_hint) if lean else None
        if self.lean is not None:
            self.packed_layers = self.lean.packed_layers
        else:
            self.packed_layers = packing.pack_linears(self.model, batch_hint) if batch_hint > 0 else 0
        self._last_logit_only = ({"logits_to_keep": 1}
                                 if "logits_to_keep" in inspect.signature(model.forward).parameters else {})

    @classmethod
    def load(cls, reference: str, revision: str | None = None, tokenizer_reference: str | None = None,
             device: str = "auto", dtype: str = "auto", batch_hint: int = 32, lean: bool = True) -> Engine:
        """`batch_hint`: the batch size linear layers are packed for (0: leave them unpacked); `lean`: use
        the lean forward pass where there is one for the architecture (GPT-2), else transformers'.

        With the lean GPT-2 pass on packed weights, `engine.model` no longer holds the block weights."""
        from ..models import load_causal_lm, load_tokenizer

        target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              ("cpu" if device == "auto" else device))
        chosen = pick_dtype(dtype, target)
        started = time.perf_counter()
        model = load_causal_lm(reference, revision, dtype=chosen).to(target)
        tokenizer = load_tokenizer(tokenizer_reference or reference, None if tokenizer_reference else revision)
        engine = cls(model, tokenizer, target, batch_hint, lean)
        log.info("loaded %s (%s, %s, %s forward, %d packed linear layers) in %.1fs", reference, target, chosen,
                 "lean" if engine.lean else "transformers", engine.packed_layers, time.perf_counter() - started)
        return engine

    def encode(self, prompt: str) -> tuple[int, ...]:
        """A prompt's token ids, as `join` feeds them to the model."""
        return tuple(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(self, items: list[Item]) -> list[Output]:
        """All items as one batch, decoded to the end; outputs in the items' order."""
        batch = Batch()
        self.join(batch, list(enumerate(items)))
        outputs: dict[int, Output] = {}
        while len(batch):
            outputs.update(self.step(batch))
        return [outputs[i] for i in range(len(items))]

    @torch.inference_mode()
    def join(self, batch: Batch, entries: list[tuple[Any, Item]]) -> None:
        """Prefills the new rows' prompts and appends them to the batch, right-aligned with its rows."""
        if not entries:
            return
        self.forward(batch)  # tokens picked but not yet run: the running rows need their logits first
        unknown = [item.prompt for _, item in entries if item.ids is None]
        encoded = iter(self.tokenizer(unknown, add_special_tokens=False)["input_ids"] if unknown else [])
        rows = [Row(key, item, list(item.ids if item.ids is not None else next(encoded)),
                    self._generator(item.decoding), logprobs=None if item.decoding.logprobs is None else [])
                for key, item in entries]
        # An empty prompt starts from BOS (EOS for GPT-2), as for unconditional text. Rows with the same
        # prompt (a request's `n` samples) share one prefill: its cache and logits are copied per row.
        inputs = [tuple(r.prompt_ids or [self.bos]) for r in rows]
        unique = list(dict.fromkeys(inputs))
        width = max(len(ids) for ids in unique)
        input_ids = torch.full((len(unique), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(unique), width), dtype=torch.long)
        for i, ids in enumerate(unique):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        cache = GrowingCache()
        logits = self._forward(input_ids, attention, positions, cache)
        if len(unique) < len(rows):
            where = {ids: i for i, ids in enumerate(unique)}
            copies = torch.tensor([where[ids] for ids in inputs], dtype=torch.long, device=self.device)
            cache.keep(copies)
            attention, positions, logits = attention[copies], positions[copies], logits[copies]
        following = positions[:, -1:] + 1
        scored: dict[tuple[int, ...], tuple[TokenLogprob, ...]] = {}
        for row, ids in zip(rows, inputs, strict=True):
            if row.item.decoding.prompt_logprobs:
                if ids not in scored:
                    scored[ids] = self._score_prompt(row.prompt_ids, int(row.item.decoding.logprobs or 0))
                row.prompt_logprobs = scored[ids]
        self._compact(batch)
        if batch.attention is None or batch.positions is None or batch.logits is None:
            batch.rows, batch.cache, batch.attention, batch.positions, batch.logits = (
                rows, cache, attention, following, logits)
            return
        length = max(batch.attention.shape[1], width)
        batch.attention = torch.cat([_pad_left(batch.attention, length), _pad_left(attention, length)])
        batch.cache.concat(cache)
        batch.positions = torch.cat([batch.positions, following])
        batch.logits = torch.cat([batch.logits, logits])
        batch.rows = batch.rows + rows

    def step(self, batch: Batch) -> list[tuple[Any, Output]]:
        """One token for every row; returns the rows that finished with it."""
        finished = self.choose(batch)
        self.forward(batch)
        return finished

    @torch.inference_mode()
    def choose(self, batch: Batch) -> list[tuple[Any, Output]]:
        """The first half of a step: picks every row's next token and returns the rows that finished with
        it; `forward` then runs the model on the tokens picked. In between, the new text is known a whole
        forward pass before the next step could tell it: a worker streams it and answers the finished
        requests there."""
        if batch.logits is None:
            return []
        distributions = self._distributions(batch)  # before _select applies penalties to the logits
        tokens = self._select(batch)
        chosen = distributions.record(tokens) if distributions is not None else {}
        finished: list[tuple[Any, Output]] = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
            if row.finish is not None:
                continue
            self._advance(row, token)
            if row.logprobs is not None and token not in self.end_tokens:
                row.logprobs.append(self._token_logprob(token, *chosen[i], int(row.item.decoding.logprobs or 0)))
            if row.finish is not None:
                finished.append((row.key, self._output(row)))
        batch.logits, batch.chosen = None, tokens
        dead = len(batch.rows) - len(batch)
        if dead and 2 * dead >= len(batch.rows):
            self._compact(batch)
        return finished

    @torch.inference_mode()
    def forward(self, batch: Batch) -> None:
        """The second half of a step: the model on the tokens `choose` picked, giving the next logits."""
        tokens, batch.chosen = batch.chosen, None
        if tokens is None or not len(batch):
            return
        assert batch.attention is not None and batch.positions is not None
        attention = torch.cat([batch.attention, batch.attention.new_ones((len(batch.rows), 1))], dim=1)
        batch.logits = self._forward(tokens[:, None], attention, batch.positions, batch.cache)
        batch.attention, batch.positions = attention, batch.positions + 1

    def streamable_texts(self, batch: Batch, wanted: Callable[[Any], bool]) -> dict[Any, Streamable]:
        """What each unfinished row whose key is `wanted` may send so far (see textstream): its text, and
        for a row with log-probabilities those of the tokens whose text lies wholly inside it."""
        found = {}
        for row in batch.rows:
            if row.finish is None and wanted(row.key):
                text = streamable(self._text(row.generated),
                                  row.item.decoding.stop)
                found[row.key] = Streamable(text, None if row.logprobs is None else self._covered(row, text))
        return found

    def _covered(self, row: Row, text: str) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the row's tokens inside `text`, counted on from the last call (what may
        be streamed only grows)."""
        assert row.logprobs is not None
        while (row.covered < len(row.logprobs) and len(
                self._text(row.generated[:row.covered + 1])) <= len(text)):
            row.covered += 1
        return tuple(row.logprobs[:row.covered])

    def cancel(self, batch: Batch, keys: set[Any]) -> None:
        """Takes the unfinished rows of `keys` out of the batch before the next step."""
        cancelled = [row for row in batch.rows if row.finish is None and row.key in keys]
        for row in cancelled:
            row.finish = "cancelled"
        if cancelled:
            self._compact(batch)

    def _forward(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                 cache: GrowingCache) -> torch.Tensor:
        """float32 logits of each row's last position; `attention` covers the cache and the new tokens."""
        if self.lean is not None:
            return self.lean(input_ids, positions, attention, cache)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         past_key_values=cache, use_cache=True, **self._last_logit_only)
        return out.logits[:, -1, :].float()

    def _advance(self, row: Row, token: int) -> None:
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        if token in self.end_tokens:
            row.finish = "stop"
            return
        row.generated.append(token)
        decoding = row.item.decoding
        if decoding.stop and self._hit_stop(row.generated, decoding.stop):
            row.finish = "stop"
        elif (len(row.generated) >= decoding.max_new_tokens
              or max(1, len(row.prompt_ids)) + len(row.generated) >= self.max_positions):
            row.finish = "length"

    def _output(self, row: Row) -> Output:
        text = self._cut_at_stop(self._text(row.generated),
                                 row.item.decoding.stop)
        return Output(text, row.finish or "length", len(row.prompt_ids), len(row.generated), row.first_token_at,
                      time.monotonic(), self._token_logprobs(row, text), row.prompt_logprobs)

    def _score_prompt(self, ids: list[int], wanted: int) -> tuple[TokenLogprob, ...]:
        """Each prompt token's log-probability given the tokens before it (one more forward pass over the
        prompt, every position's logits kept); the first token has none."""
        if not ids:
            return ()
        first = TokenLogprob(self.tokenizer.decode([ids[0]]), None, token_bytes=tuple(self.token_bytes(ids[0])))
        if len(ids) == 1:
            return (first,)
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        if self.lean is not None:
            logits = self.lean(input_ids, positions, torch.ones_like(input_ids), GrowingCache(), every_position=True)
        else:
            logits = self.model(input_ids=input_ids, position_ids=positions).logits.float()
        log_probabilities = logits[0, :-1].log_softmax(dim=-1)
        following = torch.tensor(ids[1:], device=self.device)[:, None]
        chosen = log_probabilities.gather(1, following).squeeze(1).tolist()
        values, top_ids = log_probabilities.topk(wanted, dim=-1) if wanted else (None, None)
        tops = ([list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)]
                if top_ids is not None and values is not None else [[] for _ in chosen])
        return (first, *(self._token_logprob(token, lp, top, wanted)
                         for token, lp, top in zip(ids[1:], chosen, tops, strict=True)))

    def _distributions(self, batch: Batch) -> _Distributions | None:
        wanted = [i for i, r in enumerate(batch.rows) if r.finish is None and r.logprobs is not None]
        if not wanted or batch.logits is None:
            return None
        index = torch.tensor(wanted, device=batch.logits.device)
        top = max(int(batch.rows[i].item.decoding.logprobs or 0) for i in wanted)
        return _Distributions(wanted, index, batch.logits[index].float().log_softmax(dim=-1), top)

    def _token_logprobs(self, row: Row, text: str) -> tuple[TokenLogprob, ...] | None:
        """The tokens of the final text with their log-probabilities: those a stop string cut off are left
        out (a token only partly before the cut too)."""
        if row.logprobs is None:
            return None
        kept = len(row.logprobs)
        while kept and len(self._text(row.generated[:kept])) > len(text):
            kept -= 1
        return tuple(row.logprobs[:kept])

    def _token_logprob(self, token: int, logprob: float, top: list[tuple[int, float]], wanted: int) -> TokenLogprob:
        return TokenLogprob(self.tokenizer.decode([token]), logprob,
                            tuple((self.tokenizer.decode([t]), lp) for t, lp in top[:wanted]),
                            tuple(self.token_bytes(token)), tuple(tuple(self.token_bytes(t)) for t, _ in top[:wanted]))

    def _compact(self, batch: Batch) -> torch.Tensor | None:
        """Drops finished rows, and the leading columns that only they needed; returns the indices of
        the rows kept, or None when there was nothing to drop."""
        if batch.attention is None or batch.positions is None:
            return None
        live = [i for i, r in enumerate(batch.rows) if r.finish is None]
        if len(live) == len(batch.rows):
            return None
        index = torch.tensor(live, dtype=torch.long, device=batch.attention.device)
        if not live:
            batch.rows, batch.cache = [], GrowingCache()
            batch.attention = batch.positions = batch.logits = batch.chosen = None
            return index
        attention = batch.attention[index]
        start = int((attention.sum(dim=0) > 0).nonzero()[0])
        batch.cache.keep(index, start)
        batch.attention = attention[:, start:]
        batch.positions = batch.positions[index]
        batch.logits = None if batch.logits is None else batch.logits[index]
        batch.chosen = None if batch.chosen is None else batch.chosen[index]
        batch.rows = [batch.rows[i] for i in live]
        return index

    def _generator(self, decoding: Decoding) -> torch.Generator | None:
        if decoding.seed is None or decoding.temperature == 0:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(decoding.seed)
        return generator

    def _text(self, tokens: list[int]) -> str:
        """A row's text, never with the clean-up of spaces (" ." to "."), which looks at what comes next:
        text decoded so far must stay the start of the text decoded later, or a stream would have sent
        what the final text does not hold. (transformers skips it for BPE tokenizers; WordPiece ones
        would apply it when their configuration asks.)"""
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _hit_stop(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        # A token holds at least one byte of text: a stop string of N bytes lies within the last N + 1 tokens.
        window = max(32, max(len(s.encode()) for s in stops) + 1)
        tail = self._text(tokens[-window:])
        return any(s in tail for s in stops)

    @staticmethod
    def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
        cuts = [text.find(s) for s in stops if s in text]
        return text[:min(cuts)] if cuts else text

    def _select(self, batch: Batch) -> torch.Tensor:
        """Next token per row: repetition, presence and frequency penalties, then greedy or temperature /
        top-k / top-p sampling."""
        assert batch.logits is not None
        logits, rows = batch.logits, batch.rows
        for i, row in enumerate(rows):
            decoding = row.item.decoding
            if row.finish is not None:
                continue
            penalty = decoding.repetition_penalty
            if penalty != 1.0:
                seen = torch.tensor(row.prompt_ids + row.generated, dtype=torch.long, device=logits.device).unique()
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
            if (decoding.presence_penalty or decoding.frequency_penalty) and row.generated:
                # OpenAI's: on the text generated so far, not the prompt.
                made, counts = torch.tensor(row.generated, dtype=torch.long, device=logits.device).unique(
                    return_counts=True)
                logits[i, made] -= decoding.frequency_penalty * counts.to(logits.dtype) + decoding.presence_penalty
        chosen = logits.argmax(dim=-1)
        sampling = [i for i, r in enumerate(rows) if r.finish is None and r.item.decoding.temperature > 0]
        if not sampling:
            return chosen
        decodings = [rows[i].item.decoding for i in sampling]
        temperatures = torch.tensor([d.temperature for d in decodings], device=logits.device)
        scores = logits[torch.tensor(sampling, device=logits.device)] / temperatures[:, None]
        vocabulary = scores.shape[1]
        limited = [j for j, d in enumerate(decodings) if 0 < d.top_k < vocabulary]
        if limited:
            ks = torch.tensor([decodings[j].top_k for j in limited], device=logits.device)
            part = scores[limited]
            kth = part.topk(int(ks.max())).values.gather(1, ks[:, None] - 1)
            scores[limited] = part.masked_fill(part < kth, float("-inf"))
        top_p = torch.tensor([d.top_p for d in decodings], device=logits.device)
        if (top_p < 1.0).any():
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            mass = sorted_scores.softmax(dim=-1)
            # Drop tokens once the mass before them already reaches top_p (the first always stays).
            drop = (mass.cumsum(dim=-1) - mass) >= top_p[:, None]
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)
        probabilities = scores.softmax(dim=-1)
        # Drawing from p as argmax(p / E) with E ~ Exp(1) (the exponential race): the same distribution as
        # multinomial, several times faster here. Seeded rows draw E from their own generator, so their
        # tokens do not depend on the batch; the others share one draw.
        race = torch.empty_like(probabilities)
        shared = [j for j, i in enumerate(sampling) if rows[i].generator is None]
        if shared:
            race[shared] = torch.rand((len(shared), vocabulary), device=logits.device)
        for j, i in enumerate(sampling):
            if rows[i].generator is not None:
                race[j] = torch.rand(vocabulary, generator=rows[i].generator, device=logits.device)
        picks = (probabilities / race.log_().neg_()).argmax(dim=-1)
        chosen[torch.tensor(sampling, device=logits.device)] = picks
        return chosen


@dataclass
class _Distributions:
    """The model's log-probabilities for the rows that asked for them, as they were before decoding."""

    rows: list[int]
    index: torch.Tensor
    log_probabilities: torch.Tensor
    top: int

    def record(self, tokens: torch.Tensor) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """Per batch row: the chosen token's log-probability and the most likely alternatives."""
        chosen = self.log_probabilities.gather(1, tokens[self.index][:, None]).squeeze(1).tolist()
        if self.top:
            values, ids = self.log_probabilities.topk(self.top, dim=-1)
            alternatives = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        else:
            alternatives = [[] for _ in self.rows]
        return {row: (lp, top) for row, lp, top in zip(self.rows, chosen, alternatives, strict=True)}


def end_tokens(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a row: the tokenizer's EOS and those of the model's generation config, which
    chat models use for the end of a turn (one id or a list), as transformers' `generate` stops on."""
    found = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found.update(configured if isinstance(configured, list | tuple) else [configured])
    return frozenset(t for t in found if isinstance(t, int))


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
