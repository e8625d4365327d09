"""Direction methods: how an edit record is found. One registered function per method, one ``conf/direction`` file.

A method gets the loaded model, the config and the stage's checkpoint, reads what it needs from the
upstream stages' outputs (``artifacts/directions``, ``artifacts/activations``, the filtered validation
splits) and returns a ``MethodResult``: the edit record, its metrics, and optionally a table of every
candidate it scored (the ``select`` stage writes them and draws the table's heatmaps).

* ``dim``: the paper's difference in means over every post-instruction position and layer, with the
  paper's selection on validation prompts (``pipeline.selection``).
* ``cone``: a k-dimensional refusal subspace (Wollschläger et al., "The Geometry of Refusal in Large
  Language Models", 2025) at ``dim``'s chosen position and layer: the ``dim`` direction, then the leading
  principal directions of the per-prompt harmful training activations minus the harmless mean, with
  the ``dim`` direction projected out; ablation removes the whole subspace, addition adds the ``dim``
  direction.
* ``cosmic``: COSMIC's choice among the same candidates (Siu et al., ACL Findings 2025), from activations
  alone, with no refusal tokens and no generation: at the layers where harmful and harmless means agree
  least, how closely ablating a candidate makes harmful prompts' activations point like the harmless
  mean, plus how closely adding it makes harmless prompts' activations point like the harmful mean
  (mean cosine over post-instruction positions and those layers); the highest sum among the candidates
  the paper's layer rule keeps wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.data_sources import load_texts
from pipeline.edit import Edit, Kernel
from pipeline.errors import ConfigError, SelectionError
from pipeline.hooks import residual_recorder, unit
from pipeline.inference import text_sequences
from pipeline.interventions import apply
from pipeline.io import load_tensors, read_json
from pipeline.models.loading import LoadedModel
from pipeline.refusal import kl_divergence, refusal_scores
from pipeline.selection import Halving, Rules, choose, chunks, layer_groups, score_candidates, score_table
from pipeline.stages.activations import site_means
from pipeline.stages.common import instructions, read_split


@dataclass
class MethodResult:
    edit: Edit
    metrics: dict
    table: pd.DataFrame | None = None  # one row per candidate: position, position_label, layer, scores, status
    chosen: dict = field(default_factory=dict)  # the chosen row's position and layer, to mark in plots
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)  # written as plots/select/<name>.{csv,png}


Method = Callable[[DictConfig, LoadedModel, Checkpoint], MethodResult]
DIRECTION_METHODS: dict[str, Method] = {}


def register(name: str):
    def wrap(fn: Method) -> Method:
        DIRECTION_METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> Method:
    if name not in DIRECTION_METHODS:
        raise ConfigError(f"unknown direction method {name!r}", f"use one of: {', '.join(DIRECTION_METHODS)}")
    return DIRECTION_METHODS[name]


def kernel_weights(kernel_cfg: DictConfig, n_layers: int) -> dict[str, torch.Tensor]:
    """Per-layer attention / MLP weights of ``direction.kernel`` (used by ``weighted_ablation``)."""
    return {f"{part}_weights": Kernel(**kernel_cfg[part]).weights(n_layers) for part in ("attention", "mlp")}


def val_instructions() -> tuple[list[str], list[str]]:
    """The filtered harmful and harmless validation instructions."""
    return tuple(instructions(read_split("filter", side, "val")) for side in ("harmful", "harmless"))


def chosen_edit(cfg: DictConfig, lm: LoadedModel, candidates: torch.Tensor, harmless_mean: torch.Tensor,
                chosen: pd.Series) -> Edit:
    """The edit record of the candidate in table row ``chosen`` (its position and layer), the paper's way."""
    pos, layer = int(chosen.position) + candidates.shape[0], int(chosen.layer)
    return Edit.of(
        candidates[pos, layer], layer, lm.n_layers, position=int(chosen.position),
        position_label=chosen.position_label, harmless_mean=harmless_mean[pos, layer].float(),
        addition_coeff=float(cfg.direction.addition_coeff), **kernel_weights(cfg.direction.kernel, lm.n_layers),
        provenance={"method": cfg.direction.name, "stage": "select", "model": cfg.model.name,
                    "params": OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["select", "direction"]),
                                                     resolve=True),
                    "derived_from": "artifacts/directions/candidates.safetensors"},
    )


@register("dim")
def dim(cfg: DictConfig, lm: LoadedModel, store: Checkpoint) -> MethodResult:
    """The paper's method: every difference-in-means candidate scored, the paper's rules, lowest bypass wins."""
    candidates = load_tensors(paths.stage_dir("directions") / "candidates.safetensors")["directions"]
    labels = read_json(paths.stage_dir("directions") / "candidates.json")["labels"]
    harmless_mean = load_tensors(paths.stage_dir("activations") / "means.safetensors")["harmless_mean"]
    rules = Rules.from_config(cfg.select)
    scores = score_candidates(lm, candidates, *val_instructions(), rules, cfg.select.scoring, cfg.runtime.batch_size,
                              cfg.select.candidates_per_pass, store, Halving(**cfg.select.halving))
    table = score_table(scores, rules, lm.n_layers, labels, candidates.norm(dim=-1))
    chosen = choose(table)  # a SelectionError carries the table, so the stage can still show why
    edit = chosen_edit(cfg, lm, candidates, harmless_mean, chosen)
    layer = edit.layer
    metrics = {
        "method": "dim",
        "position": int(chosen.position),
        "layer": layer,
        "layer_fraction": round(layer / lm.n_layers, 4),
        "bypass_score": round(float(chosen.bypass_score), 4),
        "induce_score": round(float(chosen.induce_score), 4),
        "kl": round(float(chosen.kl), 5),
        "baseline_harmful_score": round(scores.baseline_harmful, 4),
        "baseline_harmless_score": round(scores.baseline_harmless, 4),
        "n_candidates": len(table),
        "n_eligible": int((table.status == "eligible").sum()),  # of those whose rules were checked
        "scoring": cfg.select.scoring,
        "prompt_passes": scores.prompt_passes,
    }
    return MethodResult(edit, metrics, table, {"position": int(chosen.position), "layer": layer})


def site_activations(lm: LoadedModel, texts: list[str], position: int, layer: int, batch_size: int) -> torch.Tensor:
    """Per-prompt residual stream ``[n, d]`` entering ``layer`` at post-instruction ``position`` (negative),
    kept one row per prompt as each batch passes: memory grows with the prompts, not with the sites."""
    rows: list[torch.Tensor] = []

    def record(site: int, resid: torch.Tensor) -> None:
        if site == layer:
            rows.append(resid[:, position].double().cpu())

    with residual_recorder(lm.model, lm.adapter, record, until=layer):  # each prompt whole, no prefix cache
        order = lm.runner(batch_size).read_passes(lm.encode(texts), lambda indices: rows.pop().unbind(0),
                                                  desc=f"activations at layer {layer}")
    return torch.stack(order)


def cone_basis(direction: torch.Tensor, offsets: torch.Tensor, k: int) -> torch.Tensor:
    """``[k, d]``: ``direction`` (as is), then unit vectors along the leading principal directions of
    ``offsets`` ``[n, d]`` (per-prompt activations minus the harmless mean) once ``direction`` is projected
    out of them, so every row after the first is orthogonal to it and to the others."""
    u = direction.double() / direction.double().norm()
    rest = offsets.double() - (offsets.double() @ u)[:, None] * u
    _, values, components = torch.linalg.svd(rest, full_matrices=False)
    spanned = components[values > 1e-6 * max(float(values.max()), 1e-12)] if len(values) else components[:0]
    if len(spanned) < k - 1:
        raise ConfigError(f"direction.k={k}, but the harmful activations span only {len(spanned)} directions "
                          "beyond the paper's", f"set direction.k to at most {len(spanned) + 1}, or use more prompts")
    return torch.cat([direction.double()[None], spanned[: k - 1]]).float()


@register("cone")
def cone(cfg: DictConfig, lm: LoadedModel, store: Checkpoint) -> MethodResult:
    """``dim``'s selection, then a ``direction.k``-dimensional basis at the chosen site (see module docstring)."""
    result = dim(cfg, lm, store)
    edit, k = result.edit, int(cfg.direction.k)
    if not 1 <= k <= 5:
        raise ConfigError(f"direction.k={k}", "choose a cone dimension from 1 to 5")
    harmful = instructions(read_split("filter", "harmful", "train"))
    offsets = site_activations(lm, harmful, edit.position, edit.layer, cfg.runtime.batch_size) - edit.harmless_mean
    basis = cone_basis(edit.direction, offsets, k)
    cosines = [round(float(unit(row) @ unit(edit.direction)), 4) for row in basis]
    edit = replace(edit, directions=basis, provenance={**edit.provenance, "method": "cone", "k": k})
    curve_cfg = cfg.direction.curve
    docs = text_sequences(lm.tokenizer, load_texts(curve_cfg.text, curve_cfg.documents), curve_cfg.max_length)
    curve = cone_curve(lm, edit, *val_instructions(), docs, cfg.runtime.batch_size)
    return MethodResult(edit, {**result.metrics, "method": "cone", "k": k, "basis_cosine_with_dim": cosines},
                        result.table, result.chosen, {"cone_k": curve})


def cone_curve(lm: LoadedModel, edit: Edit, harmful: list[str], harmless: list[str],
               docs: list[tuple[list[int], int]], batch_size: int) -> pd.DataFrame:
    """What each added dimension of the cone removes and costs. Row ``j`` (0 = the unedited model) ablates
    the first ``j`` basis vectors: the mean refusal score of the harmful validation prompts (the paper's
    logit metric, no generation), the first-token KL from the unedited model on the harmless ones, and
    the cross-entropy on ``docs`` (``text_sequences``) with its change from the unedited model."""
    runner, prefix = lm.runner(batch_size, progress=False), lm.chat.prefix_ids
    harmful_ids, harmless_ids = lm.encode(harmful), lm.encode(harmless)

    def measure() -> tuple[float, torch.Tensor, float]:
        refusal = float(refusal_scores(runner.last_logits(harmful_ids, prefix), lm.refusal_ids).mean())
        nll = runner.response_nll(docs)
        return refusal, runner.last_logits(harmless_ids, prefix), sum(n for n, _ in nll) / sum(c for _, c in nll)

    refusal, reference, base_ce = measure()
    rows = [{"k": 0, "refusal_score": refusal, "kl": 0.0, "ce": base_ce}]
    for j in range(1, len(edit.directions) + 1):
        with apply(lm, "ablation", replace(edit, directions=edit.directions[:j])):
            refusal, logits, ce = measure()
        rows.append({"k": j, "refusal_score": refusal, "kl": float(kl_divergence(reference, logits).mean()), "ce": ce})
    curve = pd.DataFrame(rows)
    curve["ce_delta"] = curve.ce - base_ce
    return curve.round(5)


def low_similarity_layers(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, share: float) -> list[int]:
    """The ``share`` of layers (at least one) whose harmful and harmless means ``[positions, sites, d]``
    point most differently (lowest cosine, averaged over positions); the embedding site and the final
    norm's input are never chosen."""
    cosine = torch.nn.functional.cosine_similarity(harmful_mean.double(), harmless_mean.double(), dim=-1).mean(0)
    inner = list(range(1, harmful_mean.shape[1] - 1))
    count = max(1, round(share * len(inner)))
    return sorted(sorted(inner, key=lambda layer: float(cosine[layer]))[:count])


def agreement(means: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine between ``means`` and ``target`` (``[positions, layers, d]``) over every position and layer."""
    return float(torch.nn.functional.cosine_similarity(means.double(), target.double(), dim=-1).mean())


def cosmic_agreements(lm: LoadedModel, candidates: torch.Tensor, todo: list[tuple[int, int]], intervention: str,
                      texts: list[str], target: torch.Tensor, layers: list[int], batch_size: int, per_pass: int,
                      store: Checkpoint) -> dict[tuple[int, int], float]:
    """For each candidate ``(position, layer)``: ``agreement`` of ``texts``' mean activations at ``layers``, with
    the candidate applied as ``intervention``, with ``target`` ``[positions, sites, d]`` (read at ``layers``).
    ``per_pass`` candidates are stacked into one forward pass (of one layer each for ``addition``), which
    stops at the last of ``layers``. Each value is checkpointed under ``cosmic/<intervention>/<pos>/<layer>``."""
    key = "cosmic/{}/{}/{}".format
    out = {c: store.get(key(intervention, *c)) for c in todo}
    left = [c for c in todo if out[c] is None]
    groups = layer_groups(left, per_pass) if intervention == "addition" else chunks(left, per_pass)
    for group in tqdm(groups, desc=f"cosmic: {intervention}"):
        edit = Edit.of(torch.stack([candidates[c] for c in group]), group[0][1], lm.n_layers)
        with apply(lm, intervention, edit, stacked=True):
            means = site_means(lm, texts, batch_size, layers, copies=len(group), desc=f"cosmic: {intervention}")
        for c, copy in zip(group, means):
            out[c] = agreement(copy, target[:, layers])
            store.put(key(intervention, *c), out[c])
    return out


@register("cosmic")
def cosmic(cfg: DictConfig, lm: LoadedModel, store: Checkpoint) -> MethodResult:
    """COSMIC's selection (see module docstring); each candidate's scores are checkpointed as they are known."""
    candidates = load_tensors(paths.stage_dir("directions") / "candidates.safetensors")["directions"]
    labels = read_json(paths.stage_dir("directions") / "candidates.json")["labels"]
    means = load_tensors(paths.stage_dir("activations") / "means.safetensors")
    layers = low_similarity_layers(means["harmful_mean"], means["harmless_mean"], cfg.direction.layer_share)
    harmful, harmless = val_instructions()
    rules = Rules.from_config(cfg.select)
    n_pos, n_sites, _ = candidates.shape
    rows, todo = [], []
    for layer in range(n_sites):
        for pos in range(n_pos):
            row = {"position": pos - n_pos, "position_label": labels[pos], "layer": layer, "cosmic_score": math.nan}
            if candidates[pos, layer].norm() == 0:
                rows.append({**row, "status": "zero_direction"})
            elif not rules.layer_allowed(layer, lm.n_layers):
                rows.append({**row, "status": "late_layer"})
            else:
                rows.append({**row, "status": "eligible"})
                todo.append((pos, layer))
    per_pass, batch_size = int(cfg.select.candidates_per_pass), cfg.runtime.batch_size
    comply = cosmic_agreements(lm, candidates, todo, "ablation", harmful, means["harmless_mean"], layers,
                               batch_size, per_pass, store)
    refuse = cosmic_agreements(lm, candidates, todo, "addition", harmless, means["harmful_mean"], layers,
                               batch_size, per_pass, store)
    for row in rows:
        if row["status"] == "eligible":
            c = (row["position"] + n_pos, row["layer"])
            row["cosmic_score"] = comply[c] + refuse[c]
    table = pd.DataFrame(rows)
    eligible = table[table.status == "eligible"]
    if eligible.empty:
        raise SelectionError("no candidate survives the layer rule", "lower select.prune_layer_fraction", table=table)
    chosen = eligible.loc[eligible.cosmic_score.idxmax()]
    edit = chosen_edit(cfg, lm, candidates, means["harmless_mean"], chosen)
    layer = edit.layer
    metrics = {"method": "cosmic", "position": int(chosen.position), "layer": layer,
               "layer_fraction": round(layer / lm.n_layers, 4), "cosmic_score": round(float(chosen.cosmic_score), 5),
               "low_similarity_layers": layers, "n_candidates": len(table), "n_eligible": len(eligible)}
    return MethodResult(edit, metrics, table, {"position": int(chosen.position), "layer": layer})
