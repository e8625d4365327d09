"""Stage ``orthogonalize``: fold an ablation into the weights, check it, and save the edited model.

``orthogonalize.intervention`` names a registered intervention that can be folded into the weights
(``auto``, the default: the one the edit record names, which a search's chosen trial does, else
``ablation``, the paper's weight orthogonalization; ``projected_ablation``, ``weighted_ablation`` and
``norm_preserving_ablation`` fold too). Every matrix that writes into the
residual stream loses the edit's direction (``pipeline.weight_edits``); with tied embeddings the
unembedding is untied first. Where the intervention also has a hook form, the stage compares next-token
logits of the edited model with the hooks on the original and fails if they disagree beyond
``orthogonalize.max_kl``. The edited model is saved with ``save_pretrained``, with the edit record beside it.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.edit import load_edit, read_edit, save_edit
from pipeline.errors import ConfigError, PipelineError
from pipeline.interventions import folded_name, get_intervention
from pipeline.io import atomic_path, write_json
from pipeline.models.loading import load_model
from pipeline.refusal import kl_divergence
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    intervention = get_intervention(folded_name(cfg.orthogonalize.intervention, read_edit(cfg.eval.edit).provenance))
    if intervention.fold is None:
        raise ConfigError(f"orthogonalize.intervention={intervention.name} cannot be folded into the weights",
                          "use ablation, projected_ablation, weighted_ablation or norm_preserving_ablation")
    lm = load_model(cfg.model, cfg.runtime.device)
    edit = load_edit(lm, cfg.eval.edit)
    blocker = lm.adapter.orthogonalization_blocker()
    out = paths.stage_dir("orthogonalized_model")
    if blocker:
        log.warning("skipping weight orthogonalization for %s: %s", cfg.model.name, blocker)
        write_json(paths.metrics("orthogonalize"), {"supported": False, "intervention": intervention.name})
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "NOT_SUPPORTED.txt").write_text(blocker + "\n")
        return
    prompts = lm.encode(instructions(read_split("data", "harmful", "test"))[: cfg.orthogonalize.check_prompts])
    runner = lm.runner(cfg.runtime.batch_size, progress=False)
    hooked = None
    if intervention.hooks is not None:
        with intervention(lm.model, lm.adapter, edit):
            hooked = runner.last_logits(prompts, lm.chat.prefix_ids)
    untied = intervention.fold(lm.model, lm.adapter, edit)
    metrics: dict = {"supported": True, "intervention": intervention.name, "untied_embeddings": untied}
    if hooked is not None:
        edited = runner.last_logits(prompts, lm.chat.prefix_ids)
        kl = float(kl_divergence(hooked, edited).mean())
        metrics |= {
            "mean_kl_vs_hooks": round(max(kl, 0.0), 7),  # float32 rounding can make an exact match -1e-9
            "max_abs_logit_diff": round(float((hooked - edited).abs().max()), 5),
            "top1_agreement": round(float((hooked.argmax(-1) == edited.argmax(-1)).float().mean()), 4),
        }
    write_json(paths.metrics("orthogonalize"), metrics)
    log.info("weight edit (%s): %s", intervention.name, metrics)
    if hooked is not None and not metrics["mean_kl_vs_hooks"] <= cfg.orthogonalize.max_kl:
        raise PipelineError(f"the folded weights disagree with the hooks (mean KL {metrics['mean_kl_vs_hooks']:.3g} "
                            f"> {cfg.orthogonalize.max_kl})", "use model.dtype=float32, or report this as a bug")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if cfg.orthogonalize.save_model:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
        save_edit(tmp, edit)
        write_json(tmp / "weight_edit.json", {"intervention": intervention.name,
                                              "saved_model": bool(cfg.orthogonalize.save_model)})


def main() -> None:
    run_stage("orthogonalize", run)


if __name__ == "__main__":
    main()
