"""Stage ``loss``: does an intervention damage ordinary language modelling?

For every intervention in ``eval.loss.interventions`` (with the edit record of ``eval.edit``, or of the stage
an ``<intervention>@<stage>`` reference names):

* cross-entropy (nats per token) on two kinds of text, as in the paper: general text
  (``eval.loss.text``; the paper used the Pile) and the model's own baseline completions of harmless
  prompts (scored on the response tokens after the chat prompt), with its change from the baseline
  and that change's 95% interval over documents. Documents are scored ``eval.loss.min_documents`` at a
  time; an intervention stops once its change's interval is at most ``eval.loss.ci_halfwidth`` nats
  either side, or ``eval.loss.ci_relative`` of the change itself (a large change is known well enough
  sooner; the baseline stops once all have stopped; at most ``max_documents``): each figure gets the
  sample it needs, no larger, and its change is against the baseline on the same documents. Each
  chunk's scores are checkpointed, so a killed stage resumes where it stopped, and kept, so a rerun that
  adds an intervention (``eval.compared``) scores only that one and what its stopping rule needs;
* the KL divergence of the next-token distribution at the end of each harmless test prompt, from the
  unedited model to the intervened one (the first-token KL that abliteration tools report).

Small deltas mean the direction can be removed without hurting the model.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline import paths
from pipeline.checkpoint import Checkpoint, content_key
from pipeline.cli import run_stage
from pipeline.conditions import with_compared
from pipeline.data_sources import load_texts
from pipeline.errors import ConfigError
from pipeline.inference import text_sequences
from pipeline.interventions import Edits, check_names
from pipeline.io import read_json, write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.refusal import kl_divergence
from pipeline.stages.common import instructions, read_split
from pipeline.stats import ratio_interval

log = logging.getLogger(__name__)


def completion_sequences(lm: LoadedModel, items: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """Chat prompt + the model's response (at most ``max_length`` response tokens), scored on the response."""
    pairs = lm.chat.encode_responses([i["instruction"] for i in items], [i["response"] for i in items])
    return [(seq[: n + max_length], n) for seq, n in pairs if len(seq) > n]


def within(interval: tuple[float, float] | None, halfwidth: float) -> bool:
    """Whether an interval exists (two documents or more) and is at most ``halfwidth`` either side."""
    return interval is not None and (interval[1] - interval[0]) / 2 <= halfwidth


def cross_entropy(rows: list[tuple[float, int]]) -> float:
    """Nats per token over ``(summed nll, tokens)`` rows."""
    return sum(n for n, _ in rows) / sum(c for _, c in rows)


def sample_cross_entropies(lm: LoadedModel, edits: Edits, names: list[str], sequences, prefix, loss_cfg: DictConfig,
                           corpus: str, store: Checkpoint) -> dict:
    """CE of each intervention on a growing prefix of ``sequences``, with its change from the baseline on the
    same documents and that change's interval over documents. An intervention stops being scored once its
    own interval is narrow enough, the baseline once every intervention has stopped (module docstring)."""
    step, target, relative = loss_cfg.min_documents, loss_cfg.ci_halfwidth, loss_cfg.get("ci_relative")
    if not (isinstance(step, int) and step >= 2):
        raise ConfigError(f"eval.loss.min_documents is {step!r}", "set it to an integer of at least 2")
    runner = lm.runner(loss_cfg.batch_size, progress=False)
    scored: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    intervals: dict[str, tuple[float, float] | None] = {}
    pending = [name for name in names if name != "baseline"]  # changes whose interval is still too wide
    baseline_only = not pending  # nothing to stop on: the baseline's CE over every document
    stores = {name: store.scope(name, edits.digest(name)) for name in names}  # a chunk's scores serve one record
    restored = 0

    def change(name: str) -> float:
        """The intervention's CE minus the baseline's, on the documents it has been scored on."""
        return cross_entropy(scored[name]) - cross_entropy(scored["baseline"][: len(scored[name])])

    with tqdm(total=len(sequences), desc=f"CE loss on {corpus}", unit="doc") as bar:
        while len(scored["baseline"]) < len(sequences) and (pending or baseline_only):
            start = len(scored["baseline"])
            chunk = sequences[start : start + step]
            for name in ["baseline", *pending]:
                rows = stores[name].get(str(start))
                restored += rows is not None
                if rows is None:
                    with edits.apply(name):
                        rows = runner.response_nll(chunk, prefix)
                    stores[name].put(str(start), rows)
                scored[name] += [tuple(row) for row in rows]
            bar.update(len(chunk))
            counts = [c for _, c in scored["baseline"]]
            for name in pending:
                intervals[name] = ratio_interval([a - b for (a, _), (b, _) in zip(scored[name], scored["baseline"])],
                                                 counts[: len(scored[name])])
            if target is not None:
                pending = [n for n in pending
                           if not within(intervals[n], max(target, (relative or 0) * abs(change(n))))]
    if restored:
        log.info("%s: %d chunks restored from checkpoint", corpus, restored)
    n_scored = {name: len(rows) for name, rows in scored.items()}
    log.info("%s: CE scored on %s of %d documents", corpus, n_scored, len(sequences))

    # the change on an intervention's own documents, and its CE as the baseline's on all of them plus that
    # change (so ce_<k> - ce_baseline = delta_<k>, whatever the sample sizes)
    delta = {k: change(k) for k in intervals}
    baseline = cross_entropy(scored["baseline"])
    return {
        "ce_baseline": round(baseline, 5),
        **{f"ce_{k}": round(baseline + d, 5) for k, d in delta.items()},
        **{f"delta_{k}": round(d, 5) for k, d in delta.items()},
        **{f"ci95_delta_{k}": ci for k, ci in intervals.items()},
        **{f"n_sequences_{k}": n_scored[k] for k in intervals},
        "n_sequences": n_scored["baseline"],
        "n_available": len(sequences),
    }


def run(cfg: DictConfig) -> None:
    loss_cfg = cfg.eval.loss
    names = with_compared(loss_cfg.interventions, cfg.eval.compared)
    check_names(names, "eval.loss.interventions / eval.compared")
    if "baseline" not in names:
        raise ConfigError("eval.loss.interventions lacks baseline", "add baseline: deltas and KL are against it")
    lm = load_model(cfg.model, cfg.runtime.device)
    edits = Edits.load(lm, names, cfg.eval.edit)
    docs = load_texts(loss_cfg.text, loss_cfg.max_documents)
    corpora = {
        "general_text": (text_sequences(lm.tokenizer, docs, loss_cfg.max_length), ()),
        "harmless_completions": (
            completion_sequences(lm, read_json(paths.completions("harmless_baseline")), loss_cfg.max_length),
            lm.chat.prefix_ids,
        ),
    }
    checkpoint = Checkpoint.open("loss", cfg, [paths.completions("harmless_baseline")], kept=True)
    metrics: dict[str, dict[str, float]] = {}
    for corpus, (sequences, prefix) in corpora.items():
        if not sequences:
            log.warning("%s: nothing to score (all responses empty?); skipping its CE loss", corpus)
            metrics[corpus] = {"n_sequences": 0}
            continue
        metrics[corpus] = sample_cross_entropies(lm, edits, names, sequences, prefix, loss_cfg, corpus,
                                                 checkpoint.scope(corpus))
    kl = first_token_kl(lm, edits, names, instructions(read_split("data", "harmless", "test")), cfg.runtime.batch_size,
                        checkpoint.scope("kl"))
    write_json(paths.metrics("loss"), {"ce_loss": metrics, "kl_harmless_test": kl})
    log.info("CE loss: %s; first-token KL on harmless test prompts: %s", metrics, kl)


def first_token_kl(lm: LoadedModel, edits: Edits, names: list[str], texts: list[str], batch_size,
                   store: Checkpoint) -> dict[str, float]:
    """Mean KL(unedited || intervened) of the next-token distribution at the end of each prompt; each
    intervention's kept in ``store`` (scoped by its record) and not measured again."""
    runner, prompts, key = lm.runner(batch_size, progress=False), lm.encode(texts), content_key(texts)
    scopes = {name: store.scope(name, edits.digest(name)) for name in names if name != "baseline"}
    out = {name: scope.get(key) for name, scope in scopes.items()}
    if any(value is None for value in out.values()):
        reference = runner.last_logits(prompts, lm.chat.prefix_ids)
        for name in [name for name, value in out.items() if value is None]:
            with edits.apply(name):
                logits = runner.last_logits(prompts, lm.chat.prefix_ids)
            out[name] = round(float(kl_divergence(reference, logits).mean()), 6)
            scopes[name].put(key, out[name])
    return out


def main() -> None:
    run_stage("loss", run)


if __name__ == "__main__":
    main()
