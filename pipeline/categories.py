"""Per-category refusal directions: is refusal one direction shared by every kind of harm, or one per kind?

For each harm category with enough prompts, the difference in means at the selected direction's site
(position, layer): the category's mean harmful activation minus the harmless mean. Two readouts:

* geometry: the pairwise cosine of the category directions (near 1 everywhere: one shared direction);
* behaviour: ablating category A's direction, the paper's refusal score on category B's held-out
  prompts, for every (A, B), next to the unablated model and the selected direction's ablation. If A's
  direction removes refusal of B as well as B's own does, the categories share their refusal mechanism.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.checkpoint import Checkpoint
from pipeline.edit import Edit
from pipeline.errors import DataError
from pipeline.interventions import apply
from pipeline.models.loading import LoadedModel
from pipeline.refusal import refusal_scores

# reference rows of the cross-ablation table, next to one row per ablated category
BASELINE = "no ablation"
SELECTED = "selected direction"


def by_category(records: list[dict]) -> dict[str | None, list[str]]:
    """Instructions grouped by their ``category`` (None: unlabelled), in record order."""
    groups: dict[str | None, list[str]] = defaultdict(list)
    for record in records:
        groups[record.get("category")].append(record["instruction"])
    return dict(groups)


def category_directions(harmful: dict[str, torch.Tensor], harmless_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """The difference in means per category: the mean of its harmful activations ``[n, d]`` minus the
    harmless mean ``[d]`` (the same harmless mean for every category, so directions differ only by what
    each kind of harm adds)."""
    return {name: acts.double().mean(0) - harmless_mean.double() for name, acts in harmful.items()}


def cosine_matrix(directions: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Pairwise cosine similarity of the directions, indexed by category on both axes."""
    units = torch.nn.functional.normalize(torch.stack(list(directions.values())).double(), dim=-1)
    names = list(directions)
    return pd.DataFrame((units @ units.T).numpy(), index=pd.Index(names, name="category"), columns=names)


def cosines_with(directions: dict[str, torch.Tensor], reference: torch.Tensor) -> dict[str, float]:
    """Each direction's cosine with ``reference`` (the selected direction)."""
    cosine = torch.nn.functional.cosine_similarity
    return {name: float(cosine(d.double(), reference.double(), dim=0)) for name, d in directions.items()}


def off_diagonal(matrix: pd.DataFrame) -> pd.Series:
    """The entries of a square matrix whose row and column differ."""
    values = matrix.stack()
    return values[[row != column for row, column in values.index]]


def _scores(lm: LoadedModel, ids: list[list[int]], batch_size: int) -> torch.Tensor:
    return refusal_scores(lm.runner(batch_size, progress=False).last_logits(ids, lm.chat.prefix_ids), lm.refusal_ids)


def cross_ablation(lm: LoadedModel, directions: dict[str, torch.Tensor], selected: torch.Tensor,
                   prompts: dict[str, list[str]], layer: int, batch_size: int,
                   store: Checkpoint | None = None) -> pd.DataFrame:
    """Refusal score of each prompt set (``prompts``: category -> instructions) with each category's direction
    ablated at every layer (the paper's ablation; ``layer`` is where the directions were read), and, as
    reference rows, with none (``BASELINE``) and with the ``selected`` direction (``SELECTED``; ``[k, d]``, e.g. a
    refusal cone's basis, ablates the whole subspace, as the method's own edit does). One row per
    (ablated, prompts): the mean refusal score and the share of prompts whose score is above 0 (the model
    about to refuse). With a ``store``, each run's scores are saved as it finishes and reused on a rerun (on
    a 1.5B model on CPU each run takes minutes)."""
    clash = {BASELINE, SELECTED} & (set(directions) | set(prompts))
    if clash:
        raise DataError(f"category name(s) {sorted(clash)} collide with the reference rows of the cross-ablation "
                        "table", "rename those categories in the data")
    names = list(prompts)
    sizes = [len(prompts[name]) for name in names]
    ids = lm.encode([text for name in names for text in prompts[name]])

    def run_scores(name: str) -> torch.Tensor:
        """The scores of run ``name`` under the hooks now active, from ``store`` if a killed stage finished it."""
        saved = store.get(name) if store is not None else None
        if saved is None:
            saved = _scores(lm, ids, batch_size).tolist()
            if store is not None:
                store.put(name, saved)
        return torch.tensor(saved)

    runs = {BASELINE: run_scores(BASELINE)}
    ablations = {**directions, SELECTED: selected}
    for ablated, direction in tqdm(ablations.items(), desc="cross-ablation", unit="direction", total=len(ablations)):
        with apply(lm, "ablation", Edit.of(direction, layer, lm.n_layers)):
            runs[ablated] = run_scores(ablated)
    rows = []
    for ablated, scores in runs.items():
        for name, mine in zip(names, scores.split(sizes), strict=True):
            rows.append({"ablated": ablated, "prompts": name, "n_prompts": len(mine),
                         "refusal_score": float(mine.mean()), "refusing_share": float((mine > 0).double().mean())})
    return pd.DataFrame(rows)


def ablation_matrix(table: pd.DataFrame, measure: str) -> pd.DataFrame:
    """One ``measure`` of a ``cross_ablation`` table as a matrix: a row per ablated category (then the
    reference rows), a column per category's test prompts."""
    names = list(dict.fromkeys(table.prompts))
    grid = table.pivot(index="ablated", columns="prompts", values=measure)
    return grid.reindex(index=[*names, SELECTED, BASELINE], columns=names).rename_axis(
        index="ablated direction", columns="test prompts of category")


def own_vs_other(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Each measure of a ``cross_ablation`` table averaged over its cells (prompt sets weigh equally): without
    ablation, with the selected direction ablated, with each category's own direction ablated (the
    diagonal), and with another category's (off the diagonal)."""
    own = table.ablated == table.prompts
    other = ~own & ~table.ablated.isin([BASELINE, SELECTED])
    cells = {"baseline": table[table.ablated == BASELINE], "selected": table[table.ablated == SELECTED],
             "own_category": table[own], "other_categories": table[other]}
    return {measure: {name: round(float(rows[measure].mean()), 4) for name, rows in cells.items()}
            for measure in ("refusal_score", "refusing_share")}
