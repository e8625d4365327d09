"""Stage ``categories``: one refusal direction per harm category, compared with each other and with ``r``.

Where the harmful prompts carry a ``category``, each category with at least ``categories.min_prompts``
train prompts (and a test prompt) gets its own difference in means at the edit record's site
(``pipeline.categories``). Writes the directions (``directions.safetensors``), their pairwise cosines
(``cosine.csv``, ``plots/categories/cosine.png``) and the cross-category ablation table: the refusal score
of each category's first ``categories.max_test_prompts`` test prompts with each category's direction
ablated, unablated and with the selected direction ablated (``cross_ablation.csv``,
``plots/categories/cross_ablation.png``). With fewer than two such categories (the offline default's
HarmBench prompts have none) it writes ``{"enabled": false, "reason": ...}`` and empty output folders.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.categories import (  # noqa: E402
    ablation_matrix,
    by_category,
    category_directions,
    cosine_matrix,
    cosines_with,
    cross_ablation,
    off_diagonal,
    own_vs_other,
)
from pipeline.checkpoint import Checkpoint  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.directions import site_activations  # noqa: E402
from pipeline.edit import edit_files, load_edit  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.io import atomic_path, save_tensors, write_json  # noqa: E402
from pipeline.models.loading import load_model  # noqa: E402
from pipeline.stages.common import read_split  # noqa: E402

log = logging.getLogger(__name__)

OUT = paths.stage_dir("categories")
PLOT_DIR = paths.PLOTS / "categories"
HOW_TO_LABEL = ("per-category directions need harmful train and test prompts labelled with the same categories: a "
                "data source whose records carry a `category` field, e.g. a `local` pool of {instruction, category} "
                "records (data=paper's train split has none: only its validation and JailbreakBench test splits, each "
                "with its own categories)")


def settings(cfg: DictConfig) -> tuple[int, int]:
    """``categories.min_prompts`` and ``categories.max_test_prompts``, checked."""
    min_prompts, max_test = cfg.categories.min_prompts, cfg.categories.max_test_prompts
    if not all(isinstance(n, int) and n >= 1 for n in (min_prompts, max_test)):
        raise ConfigError(f"categories.min_prompts={min_prompts!r}, categories.max_test_prompts={max_test!r}",
                          "set both to whole numbers of at least 1")
    return min_prompts, max_test


def counts(train: dict, test: dict, names) -> dict[str, dict[str, int]]:
    return {name: {"train": len(train.get(name, [])), "test": len(test.get(name, []))} for name in names}


def plot_matrices(panels: dict[str, tuple[pd.DataFrame, dict]], path: Path) -> None:
    """Annotated heatmaps side by side; ``panels``: title -> (matrix, ``imshow`` colour options)."""
    n_rows, n_cols = max(len(m.index) for m, _ in panels.values()), max(len(m.columns) for m, _ in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (2.5 + 0.6 * n_cols), 2.0 + 0.45 * n_rows),
                             squeeze=False)
    for ax, (title, (matrix, colours)) in zip(axes[0], panels.items(), strict=True):
        image = ax.imshow(matrix.to_numpy(dtype=float), **colours)
        for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
            red, green, blue, _ = image.cmap(image.norm(value))  # white text on dark cells, black on light ones
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(matrix.index)), matrix.index, fontsize=7)
        ax.set_xlabel(matrix.columns.name or matrix.index.name or "")
        ax.set_ylabel(matrix.index.name or "")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def disabled(reason: str, metrics: dict) -> None:
    """Say why there is nothing to compare; leave the stage's outputs empty (DVC expects the folders)."""
    for folder in (OUT, PLOT_DIR):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    write_json(paths.metrics("categories"), {"enabled": False, "reason": reason, **metrics})
    log.info("stage categories skipped: %s", reason)


def run(cfg: DictConfig) -> None:
    min_prompts, max_test = settings(cfg)
    train = by_category(read_split("data", "harmful", "train"))
    test = by_category(read_split("data", "harmful", "test"))
    unlabelled = {"unlabelled": counts(train, test, [None])[None]}
    labelled = sorted({*train, *test} - {None})
    used = [name for name in labelled if len(train.get(name, [])) >= min_prompts and test.get(name)]
    skipped = {"skipped": counts(train, test, [name for name in labelled if name not in used])}
    if set(train) <= {None}:
        disabled(f"data={cfg.data.name}: no harmful train prompt has a category; {HOW_TO_LABEL}",
                 {**skipped, **unlabelled})
        return
    if len(used) < 2:
        disabled(f"{len(used)} categories have at least categories.min_prompts={min_prompts} harmful train prompts "
                 "and a test prompt, and a comparison needs 2: lower categories.min_prompts, or use a data set with "
                 "more labelled prompts", {**skipped, **unlabelled})
        return
    lm = load_model(cfg.model, cfg.runtime.device)
    edit = load_edit(lm, cfg.eval.edit)
    if edit.position is None or edit.harmless_mean is None:
        raise ConfigError(f"the edit record in artifacts/{cfg.eval.edit} has no read site or harmless mean",
                          f"re-run the stage that wrote it (`dvc repro {cfg.eval.edit}`)")
    sizes = [len(train[name]) for name in used]
    activations = site_activations(lm, [text for name in used for text in train[name]], edit.position, edit.layer,
                                   cfg.runtime.batch_size)
    directions = category_directions(dict(zip(used, activations.split(sizes), strict=True)), edit.harmless_mean)
    cosine = cosine_matrix(directions)
    prompts = {name: test[name][:max_test] for name in used}
    checkpoint = Checkpoint.open("categories", cfg, [paths.split_file("data", "harmful", split) for split in
                                                     ("train", "test")] + edit_files(cfg.eval.edit))
    table = cross_ablation(lm, directions, edit.directions, prompts, edit.layer, cfg.runtime.batch_size, checkpoint)

    save_tensors(OUT / "directions.safetensors", {"directions": torch.stack(list(directions.values())).float()},
                 metadata={"categories": used, "layer": edit.layer, "position": edit.position})
    with atomic_path(OUT / "cosine.csv") as tmp:
        cosine.round(6).to_csv(tmp)
    with atomic_path(OUT / "cross_ablation.csv") as tmp:
        table.round(6).to_csv(tmp, index=False)
    plot_matrices({"cosine of per-category refusal directions": (cosine, {"cmap": "RdBu_r", "vmin": -1, "vmax": 1})},
                  PLOT_DIR / "cosine.png")
    limit = max(float(table.refusal_score.abs().max()), 1e-6)  # colour scale symmetric around 0 (refuse / comply)
    plot_matrices({
        "mean refusal score": (ablation_matrix(table, "refusal_score"),
                               {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit}),
        "share about to refuse (score > 0)": (ablation_matrix(table, "refusing_share"),
                                              {"cmap": "viridis", "vmin": 0, "vmax": 1}),
    }, PLOT_DIR / "cross_ablation.png")
    metrics = {
        "enabled": True, "layer": edit.layer, "position": edit.position,
        "categories": counts(train, prompts, used), **skipped, **unlabelled,
        "mean_offdiagonal_cosine": round(float(off_diagonal(cosine).mean()), 4),
        "cosine_with_selected": {name: round(v, 4) for name, v in cosines_with(directions, edit.direction).items()},
        "cross_ablation": own_vs_other(table),
    }
    write_json(paths.metrics("categories"), metrics)
    checkpoint.clear()
    log.info("per-category directions: %s", metrics)


def main() -> None:
    run_stage("categories", run)


if __name__ == "__main__":
    main()
