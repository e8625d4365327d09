"""Stage ``orthogonalize``: fold directional ablation into the weights and check it is the same model.

Every matrix that writes into the residual stream is projected off ``r̂``: the token embedding (rows)
and each block's attention output and MLP down projections (output side, and their biases). With
tied embeddings the unembedding is untied first, since hook ablation never touches it. The stage
then compares next-token logits of the edited model with hook ablation on the original, fails if
they disagree beyond ``orthogonalize.max_kl``, and saves the edited model with ``save_pretrained``.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.errors import PipelineError
from pipeline.hooks import directional_ablation, unit
from pipeline.io import atomic_path, write_json
from pipeline.models.adapters import ModelAdapter
from pipeline.models.loading import load_model
from pipeline.refusal import kl_divergence
from pipeline.stages.common import chosen_direction, instructions, read_split

log = logging.getLogger(__name__)


def _untie_output_embedding(model: nn.Module) -> bool:
    """Give the unembedding its own copy of tied weights; True if they were tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, adapter: ModelAdapter, direction: torch.Tensor) -> bool:
    """Project ``r̂`` out of every residual-stream writer, in place. Returns whether embeddings were untied."""
    blocker = adapter.orthogonalization_blocker()
    if blocker:
        raise PipelineError(f"weight orthogonalization is not exact for this family: {blocker}",
                            "use hook ablation (the other stages do) and set orthogonalize.save_model=false")
    untied = _untie_output_embedding(model)
    u = unit(direction)
    embedding = adapter.embedding(model).weight
    e = embedding.float()
    embedding.copy_(e - (e @ u.to(e.device))[:, None] * u.to(e.device)[None, :])
    for block in adapter.blocks(model):
        for linear in adapter.output_projections(block):
            w = linear.weight.float()  # [d_model, d_in]: columns live in the residual stream
            uu = u.to(w.device)
            linear.weight.copy_(w - uu[:, None] * (uu[None, :] @ w))
            if linear.bias is not None:
                b = linear.bias.float()
                linear.bias.copy_(b - (b @ uu) * uu)
    return untied


def run(cfg: DictConfig) -> None:
    lm = load_model(cfg.model, cfg.runtime.device)
    direction, meta = chosen_direction(lm)
    blocker = lm.adapter.orthogonalization_blocker()
    out = paths.stage_dir("orthogonalized_model")
    if blocker:
        log.warning("skipping weight orthogonalization for %s: %s", cfg.model.name, blocker)
        write_json(paths.metrics("orthogonalize"), {"supported": False})
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "NOT_SUPPORTED.txt").write_text(blocker + "\n")
        return
    prompts = lm.encode(instructions(read_split("data", "harmful", "test"))[: cfg.orthogonalize.check_prompts])
    runner = lm.runner(cfg.runtime.batch_size, progress=False)
    with directional_ablation(lm.model, lm.adapter, direction):
        hooked = runner.last_logits(prompts, lm.chat.prefix_ids)
    untied = orthogonalize_weights(lm.model, lm.adapter, direction)
    edited = runner.last_logits(prompts, lm.chat.prefix_ids)
    kl = float(kl_divergence(hooked, edited).mean())
    metrics = {
        "supported": True,
        "mean_kl_vs_hooks": round(kl, 7),
        "max_abs_logit_diff": round(float((hooked - edited).abs().max()), 5),
        "top1_agreement": round(float((hooked.argmax(-1) == edited.argmax(-1)).float().mean()), 4),
        "untied_embeddings": untied,
    }
    write_json(paths.metrics("orthogonalize"), metrics)
    log.info("weight edit vs hook ablation: %s", metrics)
    if not kl <= cfg.orthogonalize.max_kl:
        raise PipelineError(f"orthogonalized weights disagree with hook ablation (mean KL {kl:.3g} > "
                            f"{cfg.orthogonalize.max_kl})", "use model.dtype=float32, or report this as a bug")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if cfg.orthogonalize.save_model:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "edit.json", {"edit": "directional ablation folded into weights", **meta,
                                       "saved_model": bool(cfg.orthogonalize.save_model)})


def main() -> None:
    run_stage("orthogonalize", run)


if __name__ == "__main__":
    main()
