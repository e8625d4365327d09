"""Stage ``activations``: mean residual stream over harmful and harmless training prompts.

The residual stream is read at the input of every block and after the last one (``n_layers + 1``
sites), at each post-instruction token. Only running sums are kept (float64), so memory is one
batch of activations plus ``positions × (n_layers + 1) × d_model`` numbers, however many prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.errors import PipelineError
from pipeline.hooks import residual_recorder
from pipeline.io import save_tensors, write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)


def site_means(lm: LoadedModel, texts: list[str], batch_size: int, sites: Sequence[int] | None = None,
               copies: int = 1, desc: str = "activations") -> torch.Tensor:
    """Mean residual stream ``[copies, positions, len(sites), d_model]`` at the post-instruction tokens, at
    ``sites`` (default every one: each block's input and the final norm's). Each pass stops after the
    last site asked for. With ``copies`` > 1 it runs that many stacked copies of each batch, for hooks that
    give every copy its own edit (``apply(..., stacked=True)``): several candidates per forward pass."""
    n_pos = lm.chat.n_post_instruction
    sites = list(range(lm.n_layers + 1)) if sites is None else sorted(sites)
    column = {site: j for j, site in enumerate(sites)}
    sums = torch.zeros(copies, n_pos, len(sites), lm.d_model, dtype=torch.float64)
    batch = torch.zeros_like(sums)

    def record(site: int, resid: torch.Tensor) -> None:
        if site in column:
            h = resid[:, -n_pos:, :].double()
            batch[:, :, column[site]] = h.view(copies, -1, *h.shape[1:]).sum(dim=1).cpu()

    def read(indices: list[int]) -> list[None]:
        # only a pass that reached its last site gets here, so a batch retried after running out of
        # memory half-way is counted once
        sums.add_(batch)
        return [None] * len(indices)

    with residual_recorder(lm.model, lm.adapter, record, until=sites[-1]):
        lm.runner(batch_size).read_passes(lm.encode(texts), read, desc=desc, copies=copies)
    means = sums / len(texts)
    if not torch.isfinite(means).all():
        raise PipelineError("activations contain NaN or inf (float16 overflow?)",
                            "set model.dtype=bfloat16 or float32")
    return means


def mean_activations(lm: LoadedModel, texts: list[str], batch_size: int, desc: str = "activations") -> torch.Tensor:
    """Mean residual stream ``[positions, n_layers + 1, d_model]`` at the post-instruction tokens."""
    return site_means(lm, texts, batch_size, desc=desc)[0]


def run(cfg: DictConfig) -> None:
    lm = load_model(cfg.model, cfg.runtime.device)
    harmful = instructions(read_split("filter", "harmful", "train"))
    harmless = instructions(read_split("filter", "harmless", "train"))
    tensors = {
        "harmful_mean": mean_activations(lm, harmful, cfg.runtime.batch_size, "harmful train").float(),
        "harmless_mean": mean_activations(lm, harmless, cfg.runtime.batch_size, "harmless train").float(),
    }
    out = paths.stage_dir("activations")
    save_tensors(out / "means.safetensors", tensors)
    write_json(out / "positions.json", {
        "labels": lm.chat.post_instruction_labels(),
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
    })


def main() -> None:
    run_stage("activations", run)


if __name__ == "__main__":
    main()
