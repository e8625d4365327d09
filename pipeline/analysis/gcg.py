"""Greedy Coordinate Gradient (Zou et al., 2023): a suffix that makes a chat model start with a target string.

Each step, the gradient of the target loss with respect to a one-hot encoding of the suffix ranks, at
every suffix position, the ``top_k`` substitutions most likely to lower the loss; ``search_width``
candidates, each replacing one random position by one random token from that position's top-k, are
scored exactly in batched forward passes, and the best one becomes the suffix. The loss is the mean
cross-entropy of the target tokens after ``prompt + suffix + post-instruction tokens``, averaged over
the prompts, so one suffix is optimised for all of them (the paper analyses one suffix over a set of
prompts).

Everything is token ids: the chat prefix and instruction (their key/value cache is computed once per
prompt and shared by every candidate), the suffix, the post-instruction tokens and the target. The
suffix is used later exactly as found (``ChatFormat.encode(..., suffix_ids)``), so there is no need for
GCG's usual filter of candidates that change when decoded and re-encoded.

PyPI's ``nanogcg`` (0.3.0) would do this, but it pins ``transformers<=4.47.1``; this project is on 5.x.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pipeline.checkpoint import Checkpoint
from pipeline.inference import cache_field
from pipeline.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    steps: int
    search_width: int
    top_k: int
    seed: int
    early_stop: bool = True   # stop once the best candidate's greedy continuation is the target, on every prompt
    checkpoint_every: int = 5
    batch_size: int = 64      # candidates per forward pass


@dataclass
class Result:
    ids: list[int]                 # the lowest-loss suffix seen
    loss: float
    losses: list[float] = field(default_factory=list)  # the current suffix's loss: initial, then after each step
    reached_target: bool = False   # whether the returned suffix makes the target the greedy continuation everywhere


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """Bool mask ``[vocab_size]`` of tokens a suffix may use: not special or added, and decoding to
    non-blank printable ASCII, so the suffix reads as plain text."""
    n = min(vocab_size, len(tokenizer))
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(texts):
        mask[i] = i not in excluded and bool(text.strip()) and text.isascii() and text.isprintable()
    return mask


def random_suffix(allowed: torch.Tensor, length: int, seed: int) -> list[int]:
    """``length`` tokens drawn uniformly from the allowed ones (the control suffix)."""
    pool = allowed.nonzero().squeeze(1)
    picks = torch.randint(len(pool), (length,), generator=torch.Generator().manual_seed(seed))
    return pool[picks].tolist()


class TargetLoss:
    """Cross-entropy of ``target`` after ``head + suffix + tail`` for each head, with the heads' caches reused.

    ``heads`` are the prompts up to the suffix (chat prefix + instruction), ``tail`` the post-instruction
    tokens. The loss of a suffix is the mean over the target tokens, then over the heads.
    """

    def __init__(self, lm: LoadedModel, heads: Sequence[Sequence[int]], tail: Sequence[int], target: Sequence[int]):
        if not heads or not target:
            raise ValueError("GCG needs at least one prompt and a non-empty target")
        self.model = lm.model
        self.cache_field = cache_field(lm.model)
        self.embedding = lm.adapter.embedding(lm.model)
        device = self.embedding.weight.device
        self.tail = torch.tensor(list(tail), device=device, dtype=torch.long)
        self.target = torch.tensor(list(target), device=device, dtype=torch.long)
        with torch.no_grad():
            self.caches = [getattr(self.model(input_ids=torch.tensor([list(h)], device=device), use_cache=True),
                                   self.cache_field) for h in heads]

    def _cache(self, index: int, rows: int):
        cache = copy.deepcopy(self.caches[index])  # a forward pass appends to its cache
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def _target_logits(self, index: int, rows: int, **inputs) -> torch.Tensor:
        """Logits ``[rows, n_target, vocab]`` at the positions that predict the target tokens."""
        n = len(self.target)
        out = self.model(use_cache=True, logits_to_keep=n + 1, **{self.cache_field: self._cache(index, rows)}, **inputs)
        return out.logits[:, :-1].float()

    def gradient(self, suffix: torch.Tensor) -> torch.Tensor:
        """``d loss / d one_hot(suffix)``, ``[len(suffix), vocab]``."""
        weight = self.embedding.weight
        one_hot = torch.nn.functional.one_hot(suffix.to(weight.device), weight.shape[0]).to(weight.dtype)
        one_hot.requires_grad_(True)
        rest = self.embedding(torch.cat([self.tail, self.target])).detach()
        for index in range(len(self.caches)):
            embeds = torch.cat([one_hot @ weight, rest])[None]
            logits = self._target_logits(index, 1, inputs_embeds=embeds)[0]
            loss = torch.nn.functional.cross_entropy(logits, self.target) / len(self.caches)
            loss.backward()
        return one_hot.grad.float()

    @torch.no_grad()
    def losses(self, candidates: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of each candidate suffix ``[B, L]`` and whether its greedy continuation is the target on every head."""
        total = torch.zeros(len(candidates))
        hits = torch.ones(len(candidates), dtype=torch.bool)
        for start in range(0, len(candidates), batch_size):
            chunk = candidates[start:start + batch_size].to(self.tail.device)
            rows = len(chunk)
            ids = torch.cat([chunk, self.tail.expand(rows, -1), self.target.expand(rows, -1)], dim=1)
            for index in range(len(self.caches)):
                logits = self._target_logits(index, rows, input_ids=ids)
                ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), self.target.expand(rows, -1),
                                                       reduction="none").mean(dim=1)
                total[start:start + rows] += ce.cpu() / len(self.caches)
                hits[start:start + rows] &= (logits.argmax(-1) == self.target).all(dim=1).cpu()
        return total, hits


def sample_candidates(suffix: torch.Tensor, gradient: torch.Tensor, allowed: torch.Tensor, width: int, top_k: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``width`` copies of ``suffix``, each with one random position set to one of its ``top_k`` best tokens."""
    scores = (-gradient).masked_fill(~allowed.to(gradient.device), -math.inf)
    top = scores.topk(min(top_k, int(allowed.sum())), dim=1).indices.cpu()  # [L, k]
    positions = torch.randint(len(suffix), (width,), generator=generator)
    choices = torch.randint(top.shape[1], (width,), generator=generator)
    candidates = suffix.repeat(width, 1)
    candidates[torch.arange(width), positions] = top[positions, choices]
    return candidates


def optimise(objective: TargetLoss, init: Sequence[int], allowed: torch.Tensor, settings: Settings,
             store: Checkpoint | None = None) -> Result:
    """Run GCG from ``init``; with a ``store``, resume from its saved state and save every few steps.

    The random generator's state is saved with the suffix, so a resumed run follows exactly the
    trajectory an uninterrupted one would.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    suffix = torch.tensor(list(init), dtype=torch.long)
    state = store.get("gcg") if store is not None else None
    if state is not None:
        suffix = torch.tensor(state["suffix"], dtype=torch.long)
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        result = Result(state["best"], state["best_loss"], state["losses"], state["reached_target"])
        log.info("GCG resumed at step %d (loss %.4f)", len(result.losses) - 1, result.losses[-1])
    else:
        loss, hit = objective.losses(suffix[None], settings.batch_size)
        result = Result(suffix.tolist(), float(loss[0]), [float(loss[0])], bool(hit[0]))
    done = len(result.losses) - 1
    bar = tqdm(total=settings.steps, initial=done, desc="GCG", unit="step")
    for step in range(done, settings.steps):
        if settings.early_stop and result.reached_target:
            break
        candidates = sample_candidates(suffix, objective.gradient(suffix), allowed, settings.search_width,
                                       settings.top_k, generator)
        losses, hits = objective.losses(candidates, settings.batch_size)
        best = int(losses.argmin())
        suffix, loss = candidates[best], float(losses[best])
        result.losses.append(loss)
        if loss < result.loss:
            result.ids, result.loss, result.reached_target = suffix.tolist(), loss, bool(hits[best])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", best=f"{result.loss:.3f}")
        finished = step + 1 == settings.steps or (settings.early_stop and result.reached_target)
        if store is not None and ((step + 1) % settings.checkpoint_every == 0 or finished):
            store.put("gcg", {"suffix": suffix.tolist(), "generator": generator.get_state().tolist(),
                              "best": result.ids, "best_loss": result.loss, "losses": result.losses,
                              "reached_target": result.reached_target})
    bar.close()
    return result
