"""Batched forward passes: last-token logits, greedy generation, response losses.

All three share one batching scheme. Prompts are sorted by length and left-padded, so the
post-instruction tokens of every row line up at the right edge. The chat prefix that every prompt
starts with (system prompt, user header) is run once per call and its key/value cache is repeated
across the batch; the rest of each prompt is fed after it with explicit position ids. Whatever hooks
are active during a call also shape the prefix cache, so interventions see exactly what a plain full
forward pass would.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from pipeline.checkpoint import Checkpoint
from pipeline.errors import ForwardStopped

log = logging.getLogger(__name__)

# Every out-of-memory back-off of this process ({"desc", "batch_size"}), recorded next to the stage's timing.
OOM_BACKOFFS: list[dict] = []
# Fixed cost of one forward pass in token-equivalents (launch, reading every weight once): a generation
# step over a small batch costs about as much as a pass over this many tokens, so on a CPU, where
# decoding is bound by reading the weights, a batch of generations costs ``max_new_tokens`` of these.
PASS_OVERHEAD = 64


def cache_field(model: PreTrainedModel) -> str:
    """The name of the KV cache in ``model``'s forward arguments and outputs: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns on every pass and goes in 5.40); earlier 5.x
    releases know only the old one. Read off the class: hooks may wrap an instance's ``forward``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Groups:
    """Prompts of several groups (conditions) run in shared batches: prompt ``i`` belongs to group
    ``of[i]``, and ``track(group_of_each_row)`` is called before every pass, so hooks that act on one
    group's rows know which rows those are (``pipeline.hooks.RowGroups.track``)."""

    of: Sequence[int]
    track: Callable[[torch.Tensor], None]

    @property
    def count(self) -> int:
        return max(self.of) + 1 if self.of else 0

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.of[i] for i in indices], dtype=torch.long)


def length_sorted_batches(lengths: Sequence[int], batch_size: int, overhead: int = PASS_OVERHEAD) -> list[list[int]]:
    """Split prompts into batches of at most ``batch_size`` that waste the least compute on padding.

    Prompts are sorted by length (longest first, so memory peaks early) and cut into consecutive
    groups chosen by dynamic programming to minimise ``sum(rows x longest) + overhead`` per batch, where
    ``overhead`` is the fixed cost of one forward pass in token-equivalents. One long outlier then gets
    a small batch of its own instead of padding every other prompt to its length.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] * (n + 1)
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        best[i] = float("inf")
        for j in range(i + 1, min(n, i + batch_size) + 1):
            cost = (j - i) * lengths[order[i]] + overhead + best[j]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    batches, i = [], 0
    while i < n:
        batches.append(order[i : cut[i]])
        i = cut[i]
    return batches


def text_sequences(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str],
                   max_length: int) -> list[tuple[list[int], int]]:
    """Tokenized documents (with the tokenizer's own BOS, if any), scored from the second token on:
    the input ``Runner.response_nll`` takes for plain-text cross-entropy."""
    ids = tokenizer(list(docs), add_special_tokens=True, truncation=True, max_length=max_length).input_ids
    return [(seq, 1) for seq in ids if len(seq) > 1]


def joinable(cache) -> bool:
    """Whether KV caches like ``cache`` can be joined along the batch after padding on the left: every layer
    a plain ``DynamicLayer`` (None, no cache: unknown, so no)."""
    return cache is not None and all(type(layer) is DynamicLayer for layer in cache.layers)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class Runner:
    """Runs a model over many prompts in batches; see the module docstring for the scheme."""

    model: PreTrainedModel
    pad_id: int
    batch_size: int = 16
    use_prefix_cache: bool = True
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @functools.cached_property
    def cache_field(self) -> str:
        return cache_field(self.model)

    def _prefix_cache(self, prefix: Sequence[int], longest: int, copies: int = 1):
        """KV cache of the shared prefix, or None where reusing it would change the result.

        Reuse puts each row's padding between the prefix and the rest of the prompt. Sliding-window
        attention measures distance in cache slots, padding included, so for such models the prefix is
        only reused while whole sequences (``longest`` tokens) fit inside the window.
        """
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        if not (self.use_prefix_cache and prefix) or (window is not None and longest > window):
            return None
        ids = torch.tensor([list(prefix)] * copies, device=self.device)
        return getattr(self.model(input_ids=ids, use_cache=True, logits_to_keep=1), self.cache_field)

    def _forward(self, bodies: Sequence[Sequence[int]], prefix_len: int, prefix_cache, use_cache=False,
                 copies: int = 1, cache_rows: torch.Tensor | None = None, **kwargs):
        """One forward pass over ``bodies`` after the cached prefix; with ``copies`` > 1 the rows are
        ``copies`` stacked repeats of the batch (copy-major) and the prefix cache has one row per copy.
        ``cache_rows`` (on the model's device) picks each row's prefix-cache row instead (one per group, see
        ``Groups``)."""
        ids, mask = left_pad(list(bodies) * copies, self.pad_id)
        batch = ids.shape[0]
        full_mask = torch.cat([torch.ones(batch, prefix_len, dtype=torch.long), mask], dim=1)
        positions = (prefix_len + mask.cumsum(-1) - 1).clamp_min(0)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            if cache_rows is None:
                cache.batch_repeat_interleave(len(bodies))
            else:
                cache.batch_select_indices(cache_rows)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=full_mask.to(self.device),
            position_ids=positions.to(self.device),
            **{self.cache_field: cache},
            use_cache=use_cache or cache is not None,
            **kwargs,
        )
        return out, full_mask, positions

    def _map_batches(
        self, prompts: Sequence[Sequence[int]], prefix: Sequence[int], fn: Callable, desc: str, extra: int = 0,
        copies: int = 1, store: Checkpoint | None = None, count_tokens: Callable[[object], int] | None = None,
        groups: Groups | None = None,
    ) -> list:
        """Call ``fn(indices, bodies, prefix_len, cache)`` per batch; return results in prompt order.

        ``extra`` is how many tokens a call appends to each prompt (generation); ``copies`` is how many
        stacked copies of each batch ``fn`` runs (so the prefix cache gets one row per copy); with
        ``groups`` the prefix cache gets one row per group, each run under its group's hooks. With a
        ``store``, each batch's (JSON-able) results are saved as it finishes and reused on a rerun; with
        ``count_tokens`` (tokens in one result) the progress bar also shows tokens per second.
        """
        if not prompts:
            return []
        if groups is not None:
            copies = groups.count
            groups.track(torch.arange(copies, device=self.device))
        cache = self._prefix_cache(prefix, max(map(len, prompts)) + extra, copies)
        prefix_len = len(prefix) if cache is not None else 0
        for p in prompts:
            if list(p[: len(prefix)]) != list(prefix):
                raise ValueError("every prompt must start with the shared prefix")
        bodies = [list(p[prefix_len:]) for p in prompts]
        results: list = [None] * len(prompts)
        # generation: each row also holds its `extra` new tokens, and each of them is one more pass
        pending = length_sorted_batches([len(b) + extra for b in bodies], self.batch_size,
                                        overhead=PASS_OVERHEAD * (1 + extra))
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress, leave=False)
        restored, tokens, start = 0, 0, time.perf_counter()
        while pending:
            indices = pending.pop(0)
            key = ",".join(map(str, indices))
            saved = store.get(key) if store is not None else None
            try:
                outputs = saved if saved is not None else fn(indices, [bodies[i] for i in indices], prefix_len, cache)
            except torch.OutOfMemoryError:
                if len(indices) == 1:
                    raise
                half = len(indices) // 2
                OOM_BACKOFFS.append({"desc": desc, "batch_size": len(indices)})
                self.batch_size = max(1, half)
                log.warning("out of memory at batch size %d; retrying with %d", len(indices), half)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                pending[:0] = [indices[:half], indices[half:]]
                continue
            if store is not None and saved is None:
                store.put(key, outputs)
            restored += saved is not None
            for i, value in zip(indices, outputs):
                results[i] = value
            if count_tokens is not None:
                tokens += sum(map(count_tokens, outputs))
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
            bar.update(len(indices))
        bar.close()
        if restored:
            log.info("%s: %d batches restored from checkpoint", desc, restored)
        return results

    @torch.inference_mode()
    def last_logits(self, prompts: Sequence[Sequence[int]], prefix: Sequence[int] = (), desc: str = "forward"):
        """Next-token logits at the last position of each prompt, float32 ``[n_prompts, vocab]``."""
        return self.last_logits_stacked(prompts, prefix, copies=1, desc=desc)[0]

    @torch.inference_mode()
    def last_logits_stacked(
        self, prompts: Sequence[Sequence[int]], prefix: Sequence[int], copies: int, desc: str = "forward"
    ) -> torch.Tensor:
        """Last-position logits of ``copies`` stacked copies of every prompt, ``[copies, n_prompts, vocab]``.

        Rows are copy-major, so hooks given one direction per copy (``[copies, d_model]``, see
        pipeline.hooks) score several candidate directions in one forward pass: bigger matrix
        multiplies and one pass overhead for all of them.
        """

        def fn(indices, bodies, prefix_len, cache):
            out, _, _ = self._forward(bodies, prefix_len, cache, copies=copies, logits_to_keep=1)
            return out.logits[:, -1].float().cpu().view(copies, len(bodies), -1).transpose(0, 1)

        rows = self._map_batches(prompts, prefix, fn, desc, copies=copies)
        if not rows:
            return torch.empty(copies, 0, 0)
        return torch.stack(rows, dim=1)

    def _track(self, groups: Groups | None, indices: Sequence[int]) -> torch.Tensor | None:
        """The group of each row of a batch of prompts ``indices`` (on the model's device), announced to the
        groups' hooks; None without groups."""
        if groups is None:
            return None
        rows = groups.rows(indices).to(self.device)
        groups.track(rows)
        return rows

    @torch.inference_mode()
    def tail_logits(self, prompts: Sequence[Sequence[int]], prefix: Sequence[int], n: int,
                    desc: str = "forward", groups: Groups | None = None) -> torch.Tensor:
        """Next-token logits at the last ``n`` positions of each prompt, float32 ``[n_prompts, n, vocab]``
        (prompts are left-padded: positions before a short prompt's start hold padding's logits). With
        ``groups``, prompts of several groups share batches, each row under its group's hooks."""

        def fn(indices, bodies, prefix_len, cache):
            out, _, _ = self._forward(bodies, prefix_len, cache, logits_to_keep=n,
                                      cache_rows=self._track(groups, indices))
            return out.logits[:, -n:].float().cpu()

        rows = self._map_batches(prompts, prefix, fn, desc, groups=groups)
        return torch.stack(rows) if rows else torch.empty(0, n, 0)

    @torch.inference_mode()
    def read_passes(self, prompts: Sequence[Sequence[int]], read: Callable[[list[int]], list],
                    desc: str = "forward", copies: int = 1) -> list:
        """Run every prompt once, whole (no prefix cache: hooks see every position), and return, in
        prompt order, what ``read(indices)`` gives for each forward pass: one value per row, row ``i``
        being prompt ``indices[i]``. ``read`` is called right after its pass, so hooks can hand over
        what they recorded during it. With ``copies`` > 1 each pass runs that many stacked copies of its
        batch (copy-major, as ``last_logits_stacked``). A pass that a recorder ends early
        (``residual_recorder(..., until=...)``) has done all that was asked of it.
        """

        def fn(indices, bodies, prefix_len, cache):
            try:
                self._forward(bodies, prefix_len, cache, copies=copies, logits_to_keep=1)
            except ForwardStopped:
                pass  # the recorder has every site it needs; the layers past them were not wanted
            return read(indices)

        return self._map_batches(prompts, (), fn, desc, copies=copies)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        prefix: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int],
        desc: str = "generate",
        store: Checkpoint | None = None,
        stop: Callable[[int, list[int]], bool] | None = None,
        groups: Groups | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt; rows that emit an EOS token leave the batch.

        ``stop(index, tokens)`` ends a row early once its generated tokens settle what is being measured
        (a refusal phrase has appeared, say); it is asked after each new token of every row still
        generating, with the row's prompt index. With a ``store`` (a Checkpoint), finished batches
        survive an interrupted run. With ``groups``, prompts of several conditions share batches (on a CPU a
        decoding step costs far less per row over many rows than over a few) and ``groups.track`` follows
        the rows as they leave.
        """
        eos = torch.tensor(sorted(set(eos_ids)), device=self.device)

        def fn(indices, bodies, prefix_len, cache):
            order, cache, mask, position, logits = self._prefill(indices, bodies, prefix_len, cache, groups)
            indices = [indices[i] for i in order]  # the rows' order from here on
            rows = self._track(groups, indices)
            mask, position = mask.to(self.device), position.to(self.device)
            alive = torch.arange(len(bodies), device=self.device)
            generated: list[list[int]] = [[] for _ in bodies]
            token = logits.argmax(-1)
            for step in range(max_new_tokens):
                for row, tok in zip(alive.tolist(), token.tolist()):
                    generated[row].append(tok)
                finished = torch.isin(token, eos)
                if stop is not None:
                    finished |= torch.tensor([stop(indices[row], generated[row]) for row in alive.tolist()],
                                             device=self.device)
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                if bool(finished.any()):
                    keep = (~finished).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    alive, token, mask, position = alive[keep], token[keep], mask[keep], position[keep]
                    if groups is not None:
                        rows = rows[keep]
                        groups.track(rows)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                out = self.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position[:, None],
                    use_cache=True,
                    **{self.cache_field: cache},
                )
                cache = getattr(out, self.cache_field)
                token = out.logits[:, -1].argmax(-1)
            by_position, ends = dict(zip(order, generated)), set(eos_ids)  # row r holds the batch's prompt order[r]
            return [[t for t in by_position[i] if t not in ends] for i in range(len(order))]

        return self._map_batches(prompts, prefix, fn, desc, extra=max_new_tokens, store=store, count_tokens=len,
                                 groups=groups)

    def _prefill(self, indices: Sequence[int], bodies: Sequence[Sequence[int]], prefix_len: int, prefix_cache,
                 groups: Groups | None) -> tuple[list[int], object, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A generation batch's first pass: ``(order, KV cache, attention mask, last positions, last logits)``
        with rows in ``order`` (positions in the batch).

        Rows of very different lengths are run in parts of similar length, cut as ``length_sorted_batches``
        cuts prompts into passes, so fewer padding positions are computed; their caches are then joined,
        padded on the left, and decode as one batch. Only caches of plain ``DynamicLayer`` layers are
        joined (a sliding window counts padding), and only after a shared prefix: otherwise one pass.
        """
        parts = length_sorted_batches([len(b) for b in bodies], len(bodies))
        if len(parts) > 1 and not joinable(prefix_cache):
            parts = [list(range(len(bodies)))]
        runs = []
        for part in parts:
            rows = self._track(groups, [indices[i] for i in part])
            out, mask, positions = self._forward([bodies[i] for i in part], prefix_len, prefix_cache, logits_to_keep=1,
                                                 use_cache=True, cache_rows=rows)
            runs.append((getattr(out, self.cache_field), mask, positions[:, -1], out.logits[:, -1]))
        order = [i for part in parts for i in part]
        if len(runs) == 1:
            return order, *runs[0]
        width = max(mask.shape[1] for _, mask, _, _ in runs)
        cache = runs[0][0]
        for layer, *others in zip(cache.layers, *(c.layers for c, _, _, _ in runs[1:])):
            joined = [layer, *others]
            layer.keys = torch.cat([F.pad(part.keys, (0, 0, width - part.keys.shape[-2], 0)) for part in joined])
            layer.values = torch.cat([F.pad(part.values, (0, 0, width - part.values.shape[-2], 0)) for part in joined])
        mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, mask, _, _ in runs])
        return order, cache, mask, torch.cat([p for _, _, p, _ in runs]), torch.cat([lg for _, _, _, lg in runs])

    @torch.inference_mode()
    def response_nll(
        self, sequences: Sequence[tuple[Sequence[int], int]], prefix: Sequence[int] = (), desc: str = "loss"
    ) -> list[tuple[float, int]]:
        """``(summed negative log-likelihood, n tokens)`` of the tokens after the first ``n_prompt`` of each."""

        def fn(indices, bodies, prefix_len, cache):
            out, _, _ = self._forward(bodies, prefix_len, cache)
            width = out.logits.shape[1]
            results = []
            for row, (index, body) in enumerate(zip(indices, bodies)):
                start = width - len(body)
                first = sequences[index][1] - prefix_len  # first scored token, as an index into body
                targets = torch.tensor(body[first:], device=self.device)
                logits = out.logits[row, start + first - 1 : start + len(body) - 1].float()
                nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                results.append((float(nll), len(body) - first))
            return results

        return self._map_batches([s for s, _ in sequences], prefix, fn, desc)
