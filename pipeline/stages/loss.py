"""Stage ``loss``: does an intervention damage ordinary language modelling?

For every intervention in ``eval.loss.interventions`` (with the ``select`` stage's edit record):

* cross-entropy (nats per token) on two kinds of text, as in the paper: general text
  (``eval.loss.text``; the paper used the Pile) and the model's own baseline completions of harmless
  prompts (scored on the response tokens after the chat prompt), with its change from the baseline;
* the KL divergence of the next-token distribution at the end of each harmless test prompt, from the
  unedited model to the intervened one (the first-token KL that abliteration tools report).

Small deltas mean the direction can be removed without hurting the model.
"""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.data_sources import load_texts
from pipeline.edit import load_edit
from pipeline.errors import ConfigError
from pipeline.interventions import apply, check_names
from pipeline.io import read_json, write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.refusal import kl_divergence
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)


def text_sequences(lm: LoadedModel, docs: list[str], max_length: int) -> list[tuple[list[int], int]]:
    """Tokenized documents (with the tokenizer's own BOS, if any), scored from the second token on."""
    ids = lm.tokenizer(docs, add_special_tokens=True, truncation=True, max_length=max_length).input_ids
    return [(seq, 1) for seq in ids if len(seq) > 1]


def completion_sequences(lm: LoadedModel, items: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """Chat prompt + the model's response (at most ``max_length`` response tokens), scored on the response."""
    pairs = lm.chat.encode_responses([i["instruction"] for i in items], [i["response"] for i in items])
    return [(seq[: n + max_length], n) for seq, n in pairs if len(seq) > n]


def cross_entropy(lm: LoadedModel, sequences, prefix, batch_size: int, desc: str) -> float:
    results = lm.runner(batch_size).response_nll(sequences, prefix, desc=desc)
    total, count = sum(r[0] for r in results), sum(r[1] for r in results)
    return total / count if count else math.nan


def run(cfg: DictConfig) -> None:
    loss_cfg = cfg.eval.loss
    names = list(loss_cfg.interventions)
    check_names(names, "eval.loss.interventions")
    if "baseline" not in names:
        raise ConfigError("eval.loss.interventions lacks baseline", "add baseline: deltas and KL are against it")
    lm = load_model(cfg.model, cfg.runtime.device)
    edit = load_edit(lm, cfg.eval.edit)
    docs = load_texts(loss_cfg.text, loss_cfg.max_documents)
    corpora = {
        "general_text": (text_sequences(lm, docs, loss_cfg.max_length), ()),
        "harmless_completions": (
            completion_sequences(lm, read_json(paths.completions("harmless_baseline")), loss_cfg.max_length),
            lm.chat.prefix_ids,
        ),
    }
    metrics: dict[str, dict[str, float]] = {}
    for corpus, (sequences, prefix) in corpora.items():
        if not sequences:
            log.warning("%s: nothing to score (all responses empty?); skipping its CE loss", corpus)
            metrics[corpus] = {"n_sequences": 0}
            continue
        values = {}
        for name in names:
            with apply(lm, name, edit):
                values[name] = cross_entropy(lm, sequences, prefix, loss_cfg.batch_size, f"{corpus} {name}")
        metrics[corpus] = {
            **{f"ce_{k}": round(v, 5) for k, v in values.items()},
            **{f"delta_{k}": round(values[k] - values["baseline"], 5) for k in names if k != "baseline"},
            "n_sequences": len(sequences),
        }
    kl = first_token_kl(lm, edit, names, instructions(read_split("data", "harmless", "test")), cfg.runtime.batch_size)
    write_json(paths.metrics("loss"), {"ce_loss": metrics, "kl_harmless_test": kl})
    log.info("CE loss: %s; first-token KL on harmless test prompts: %s", metrics, kl)


def first_token_kl(lm: LoadedModel, edit, names: list[str], texts: list[str], batch_size) -> dict[str, float]:
    """Mean KL(unedited || intervened) of the next-token distribution at the end of each prompt."""
    runner, prompts = lm.runner(batch_size, progress=False), lm.encode(texts)
    reference = runner.last_logits(prompts, lm.chat.prefix_ids)
    out = {}
    for name in names:
        if name == "baseline":
            continue
        with apply(lm, name, edit):
            logits = runner.last_logits(prompts, lm.chat.prefix_ids)
        out[name] = round(float(kl_divergence(reference, logits).mean()), 6)
    return out


def main() -> None:
    run_stage("loss", run)


if __name__ == "__main__":
    main()
