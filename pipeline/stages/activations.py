"""Stage ``activations``: mean residual stream over harmful and harmless training prompts.

The residual stream is read at the input of every block and after the last one (``n_layers + 1``
sites), at each post-instruction token. Only running sums are kept (float64), so memory is one
batch of activations plus ``positions × (n_layers + 1) × d_model`` numbers, however many prompts.
"""

from __future__ import annotations

import logging

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


def mean_activations(lm: LoadedModel, texts: list[str], batch_size: int, desc: str = "activations") -> torch.Tensor:
    """Mean residual stream ``[positions, n_layers + 1, d_model]`` at the post-instruction tokens."""
    n_pos = lm.chat.n_post_instruction
    sums = torch.zeros(n_pos, lm.n_layers + 1, lm.d_model, dtype=torch.float64)
    batch = torch.zeros_like(sums)

    def record(layer: int, resid: torch.Tensor) -> None:
        # a batch only counts once its forward pass reaches the last site, so a batch retried after
        # running out of memory half-way is not counted twice
        if layer == 0:
            batch.zero_()
        batch[:, layer] = resid[:, -n_pos:, :].double().sum(dim=0).cpu()
        if layer == lm.n_layers:
            sums.add_(batch)

    runner = lm.runner(batch_size)
    runner.use_prefix_cache = False  # the recorder must only see the prompts' own forward passes
    with residual_recorder(lm.model, lm.adapter, record):
        runner.last_logits(lm.encode(texts), desc=desc)
    means = sums / len(texts)
    if not torch.isfinite(means).all():
        raise PipelineError("activations contain NaN or inf (float16 overflow?)",
                            "set model.dtype=bfloat16 or float32")
    return means


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
