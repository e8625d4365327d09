"""Stage ``heads``: the attention heads that write the refusal direction, and whether a suffix distracts them.

Every head's direct contribution along ``r̂`` at the last prompt token (``pipeline.analysis.heads``)
is averaged over the held-out harmful prompts; the ``analysis.heads.top_k`` largest, among heads in
layers before the direction's layer (those that write into the residual stream it is read from), are
the top heads. For them, and for every prompt set of the ``suffix`` stage: the contribution, and the
share of the last token's attention on the instruction vs the suffix (and the chat template). The
paper's finding: with the adversarial suffix the top heads attend to the suffix instead of the
instruction and write less along ``r``; a random suffix does much less.
"""

from __future__ import annotations

import logging

import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline import figures, paths
from pipeline.analysis.heads import REGIONS, eager_attention, head_readout, region_shares
from pipeline.cli import run_stage
from pipeline.edit import load_edit
from pipeline.errors import ConfigError
from pipeline.io import atomic_path, write_json
from pipeline.models.loading import load_model
from pipeline.stages.suffix import analysis_disabled, prompt_sets, read_suffixes, style

log = logging.getLogger(__name__)


def top_heads(contribution: torch.Tensor, below_layer: int, k: int) -> list[tuple[int, int]]:
    """``(layer, head)`` of the ``k`` largest mean contributions (``[prompts, layers, heads]``) in layers
    before ``below_layer``."""
    mean = contribution[:, :below_layer].mean(0)
    order = mean.flatten().argsort(descending=True)[:k]
    return [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in order]


def contribution_table(readouts: dict) -> pd.DataFrame:
    """Mean contribution of every head per prompt set: prompt_set, layer, head, contribution."""
    frames = []
    for name, readout in readouts.items():
        mean = readout.contribution.mean(0)
        index = pd.MultiIndex.from_product([range(mean.shape[0]), range(mean.shape[1])], names=["layer", "head"])
        frames.append(pd.DataFrame({"prompt_set": name, "contribution": mean.reshape(-1).numpy()},
                                   index=index).reset_index())
    return pd.concat(frames, ignore_index=True)


def run(cfg: DictConfig) -> None:
    if analysis_disabled(cfg, "heads"):
        return
    lm = load_model(cfg.model, cfg.runtime.device)
    edit = load_edit(lm, cfg.eval.edit)
    direction = edit.direction
    if edit.layer == 0:
        raise ConfigError("the direction is at layer 0: no attention head writes before it",
                          "re-run select (layer-0 candidates are never chosen by the paper's rules)")
    sets = prompt_sets(lm, cfg, read_suffixes(), harmless=False)
    with eager_attention(lm.model):
        readouts = {name: head_readout(lm, s.ids, direction, cfg.runtime.batch_size, desc=f"heads {name}")
                    for name, s in sets.items()}
    heads = top_heads(readouts["harmful"].contribution, edit.layer, cfg.analysis.heads.top_k)
    n_prefix, n_post = len(lm.chat.prefix_ids), lm.chat.n_post_instruction
    rows = []
    for name, readout in readouts.items():
        shares = torch.stack([region_shares(a, n_prefix, sets[name].n_suffix, n_post) for a in readout.attention])
        for rank, (layer, head) in enumerate(heads):
            rows.append({"prompt_set": name, "rank": rank, "item": f"L{layer}H{head}", "layer": layer, "head": head,
                         "contribution": float(readout.contribution[:, layer, head].mean()),
                         **{f"attention_{r}": float(shares[:, layer, head, i].mean()) for i, r in enumerate(REGIONS)}})
    table = pd.DataFrame(rows)
    with atomic_path(paths.stage_dir("heads") / "top_heads.csv") as tmp:
        table.round(5).to_csv(tmp, index=False)
    with atomic_path(paths.stage_dir("heads") / "contributions.csv") as tmp:
        contribution_table(readouts).round(5).to_csv(tmp, index=False)
    figures.grouped_bars(
        table, {"contribution": "output · r̂ (last token)", "attention_instruction": "attention on instruction",
                "attention_suffix": "attention on suffix"}, style,
        f"Top {len(heads)} heads by direct contribution along r (layers < {edit.layer}), mean over prompts",
        paths.PLOTS / "heads" / "top_heads.png")
    per_set = table.groupby("prompt_set", sort=False)[["contribution", "attention_instruction", "attention_suffix"]]
    means = per_set.mean()
    metrics = {"enabled": True, "layer": edit.layer, "top_heads": [f"L{l}H{h}" for l, h in heads],
               **{f"top_heads_{column}": {name: round(float(v), 4) for name, v in means[column].items()}
                  for column in means.columns}}
    write_json(paths.metrics("heads"), metrics)
    log.info("heads: %s", metrics)


def main() -> None:
    run_stage("heads", run)


if __name__ == "__main__":
    main()
