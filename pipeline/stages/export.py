"""Stage ``export``: the edited model as people run it, checked file by file, with a model card.

Reads the edited model the ``orthogonalize`` stage saved (``artifacts/orthogonalized_model``) and writes
``artifacts/export/`` (as a whole, atomically):

* ``safetensors`` (in ``export.formats``): the saved model's weights, config and tokenizer, hard-linked
  (or copied) so the folder loads with ``from_pretrained``;
* ``gguf``: one file per ``export.gguf_types`` entry, ``<model name>.<TYPE>.gguf``. A model that came
  from a GGUF (``pypi_gguf``) is written from that file with only the edited tensors replaced (every
  other tensor and all metadata byte for byte); any other model is converted whole (``write_from_model``);
* ``edit/``: the edit record and ``weight_edit.json`` the weights were made from;
* ``README.md``: a Hugging Face model card built from the run's metrics files (``pipeline.model_card``).

Every GGUF is read back (transformers' GGUF loader, float32) and its next-token logits on the first
``export.check_prompts`` harmful test prompts (the pipeline's own chat encoding) are compared with

* ``vs_intervention``: ``orthogonalize.intervention`` applied to the original model (float32): what the
  file is meant to be, so this includes both the edit's and the file's rounding;
* ``vs_own_weights``: the edited weights rounded the way the file stores them (``as_stored``; for a
  source GGUF, the source's own tensors with the edited ones replaced): the file read back exactly.

The stage writes ``metrics/export.json`` first, then fails if any file's ``vs_intervention`` mean KL
exceeds ``export.max_kl``. At most two full models are held at once (the GGUF reference and one
loaded-back file; usually one).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from gguf import MODEL_ARCH
from omegaconf import DictConfig, OmegaConf

from pipeline import paths
from pipeline.chat import ChatFormat
from pipeline.cli import run_stage
from pipeline.edit import load_edit, read_edit
from pipeline.errors import ConfigError, PipelineError
from pipeline.gguf_export import (
    as_stored,
    compare_next_token,
    dequantize_like_file,
    edited_parameter_names,
    gguf_architecture,
    load_back,
    quant_type,
    write_from_model,
    write_from_source,
)
from pipeline.interventions import apply, folded_name, get_intervention
from pipeline.io import atomic_path, read_json, write_json
from pipeline.model_card import model_card
from pipeline.models.loading import _assemble_gguf, load_model, load_pretrained, resolve_device
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "gguf")
EDIT_FILES = ("edit.json", "edit.safetensors", "weight_edit.json")  # go to export/edit/, not beside the weights
# metrics files the model card reports (each only if present)
CARD_METRICS = ("data", "select", "search", "refusal", "safety", "loss", "orthogonalize", "capabilities",
                "over_refusal")
SOURCE_KEYS = {"name": "general.name", "basename": "general.basename", "size_label": "general.size_label",
               "base_model_repo_url": "general.base_model.0.repo_url",
               "source_repository": "general.source.huggingface.repository"}


# ------------------------------------------------------------------------------------------------ checks


def check_formats(formats: list[str], gguf_types: list[str], check_prompts: int = 1) -> None:
    """Refuse unknown formats or GGUF types (or no prompts to check GGUF files on) before any work."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"export.formats={formats}: unknown or no format ({unknown or 'empty'})",
                          f"use one or both of {list(FORMATS)}")
    if "gguf" in formats:
        if not gguf_types:
            raise ConfigError("export.formats has gguf but export.gguf_types is empty",
                              "list at least one type, e.g. export.gguf_types=[Q8_0]")
        for qtype in gguf_types:
            quant_type(qtype)
        if len(set(gguf_types)) != len(gguf_types):
            raise ConfigError(f"export.gguf_types={gguf_types} repeats a type", "list each type once")
        if not check_prompts >= 1:
            raise ConfigError(f"export.check_prompts={check_prompts}: every GGUF file is checked on prompts",
                              "set export.check_prompts to 1 or more (8 by default)")


def saved_model_dir(configured: str, edit_source: str) -> tuple[Path, str]:
    """The orthogonalize stage's saved model and the intervention folded into it (``configured``, with ``auto``
    resolved from the edit record), or a clear error if it has none (or one of another edit)."""
    folder = paths.stage_dir("orthogonalized_model")
    status_file, blocked = paths.metrics("orthogonalize"), folder / "NOT_SUPPORTED.txt"
    status = read_json(status_file) if status_file.exists() else {}
    if status.get("supported") is False or blocked.exists():
        reason = blocked.read_text().strip() if blocked.exists() else f"{status_file} says supported: false"
        raise ConfigError(f"there is no edited model to export: this model family does not support weight edits "
                          f"({reason})", "export needs a family whose weight edit is exact (not Gemma 2/3); "
                          "evaluate this model with hook interventions instead")
    if not (folder / "config.json").exists():
        raise ConfigError(f"{folder} holds no saved model",
                          "set orthogonalize.save_model=true and run `dvc repro orthogonalize`")
    record = folder / "weight_edit.json"
    saved = read_json(record).get("intervention") if record.exists() else None
    intervention = get_intervention(folded_name(configured, read_edit(edit_source).provenance)).name
    if saved != intervention:
        raise ConfigError(f"{folder} holds the {saved!r} weight edit, orthogonalize.intervention is {intervention!r}",
                          "re-run the orthogonalize stage (`dvc repro orthogonalize`)")
    return folder, intervention


def check_gguf_model(config: dict) -> None:
    """Refuse, before any work, a saved model whose GGUF could not be written or read back to check it."""
    if gguf_architecture(config.get("model_type")) == MODEL_ARCH.GEMMA:
        raise ConfigError("GGUF export of Gemma models cannot be checked here (transformers cannot read gemma "
                          "GGUF files back, and llama.cpp's gemma has no separate unembedding for the untied edit)",
                          "use export.formats=[safetensors] and convert with llama.cpp's convert_hf_to_gguf.py")


# ------------------------------------------------------------------------------------------------ files


def source_gguf(source: DictConfig) -> Path | None:
    """The GGUF file the model was loaded from (``pypi_gguf``: assembled and cached by the loader), else None."""
    if source.type != "pypi_gguf":
        return None
    return _assemble_gguf(source)


def source_metadata(path: Path | None) -> dict:
    """A few ``general.*`` keys of a source GGUF (its name, the base model it names), for the model card."""
    if path is None:
        return {}
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    out = {key: str(fields[name].contents()) for key, name in SOURCE_KEYS.items() if name in fields}
    del fields
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_saved(saved: Path, out: Path, weights: bool) -> int:
    """The edit record into ``out/edit/``; with ``weights``, every other file of the saved model into ``out``.

    Returns the bytes of the model files (weights, config, tokenizer) placed.
    """
    total = 0
    for src in sorted(p for p in saved.rglob("*") if p.is_file()):
        rel = src.relative_to(saved)
        if rel.as_posix() in EDIT_FILES:
            _link_or_copy(src, out / "edit" / rel)
        elif weights:
            _link_or_copy(src, out / rel)
            total += src.stat().st_size
    return total


def listing(folder: Path) -> list[dict]:
    """``[{path, bytes}]`` of every file under ``folder``, sorted."""
    return [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def gguf_file_name(model_name: str, qtype: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"
    return f"{safe}.{qtype}.gguf"


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _comparison(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {k: _sig(v) for k, v in compare_next_token(reference, other).items()}


def _free() -> None:
    """Give back the memory of models just deleted."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ GGUF


def edited_model_config(cfg: DictConfig, saved: Path) -> DictConfig:
    """The model config of the saved edited model, in float32 (exact for any saved dtype)."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    spec["name"] = f"{cfg.model.name}-orthogonalized"
    spec["source"] = {"type": "local", "path": str(saved)}
    spec["dtype"] = "float32"
    return OmegaConf.create(spec)


@torch.no_grad()
def source_reference(source: Path, tensors: dict[str, torch.Tensor], untie: bool, head: torch.Tensor | None,
                     device: str):
    """The model a source-GGUF export should read back as: the source file's own tensors with ``tensors``
    (the edited ones, rounded as stored) in their place and, when the export added an ``output.weight``
    (``untie``), an unembedding of its own: ``head``, or the source's embedding as it was."""
    model, _ = load_back(source, torch.float32)
    if untie:
        own = head if head is not None else model.get_input_embeddings().weight.detach().clone()
        model.get_output_embeddings().weight = torch.nn.Parameter(own, requires_grad=False)
        model.config.tie_word_embeddings = False
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        params[name].copy_(tensor)
    return model.to(device)


def _write(cfg: DictConfig, saved: Path, out: Path, qtype: str, source: Path | None, adapter, device: str):
    """Write one GGUF from the saved edited model; returns ``(summary, seconds, reference model)``, the
    reference being the edited weights as the file stores them. Holds at most two models at a time."""
    model, tokenizer = load_pretrained(edited_model_config(cfg, saved), cfg.runtime.device)
    names = edited_parameter_names(model, adapter)
    start = time.perf_counter()
    if source is not None:
        summary = write_from_source(source, model.state_dict(), names, out, qtype)
    else:
        summary = write_from_model(model, tokenizer, out, qtype, name=f"{cfg.model.name}-orthogonalized")
    seconds = time.perf_counter() - start
    if source is None:
        as_stored(model, qtype)
        return summary, seconds, model
    params = dict(model.named_parameters())
    tensors = {n: dequantize_like_file(params[n], qtype) for n in names}  # what the file holds for them
    added = summary.get("output_weight_added")  # None, the source's embedding bytes, or lm_head in qtype
    head = (dequantize_like_file(model.get_output_embeddings().weight, qtype)
            if added is not None and added.startswith("lm_head") else None)
    del params, model, tokenizer
    _free()
    return summary, seconds, source_reference(source, tensors, added is not None, head, device)


def chat_encoding_matches(tokenizer, model_cfg: DictConfig, adapter, texts: list[str], prompts) -> bool:
    """Whether the file's own tokenizer and chat template encode the check prompts as the pipeline did."""
    try:
        chat = ChatFormat.from_tokenizer(
            tokenizer, system_prompt=model_cfg.get("system_prompt"), fallback_template=adapter.fallback_chat_template,
            supports_system_prompt=adapter.supports_system_prompt,
            template_kwargs=model_cfg.get("chat_template_kwargs"))
        return chat.encode(texts) == [list(p) for p in prompts]
    except (PipelineError, ValueError) as error:
        log.warning("the GGUF's tokenizer cannot encode the chat prompts: %s", error)
        return False


def export_gguf(cfg: DictConfig, intervention: str, saved: Path, out_dir: Path, qtypes: list[str],
                source: Path | None, texts: list[str]) -> dict:
    """Write one GGUF per type and check it on ``texts``; returns the per-type metrics."""
    device = resolve_device(cfg.runtime.device)

    lm = load_model(cfg.model, cfg.runtime.device)
    lm.model.float()  # the reference in float32, like the files read back
    edit = load_edit(lm, cfg.eval.edit)
    prompts, prefix = lm.encode(texts), lm.chat.prefix_ids
    runner = lm.runner(cfg.runtime.batch_size, progress=False)
    with apply(lm, intervention, edit):
        intended = runner.last_logits(prompts, prefix)
    adapter = lm.adapter
    runner = replace(runner, model=None)
    del lm
    _free()

    results = {}
    for qtype in qtypes:
        path = out_dir / gguf_file_name(cfg.model.name, qtype)
        log.info("writing %s", path.name)
        summary, write_seconds, reference = _write(cfg, saved, path, qtype, source, adapter, device)
        start = time.perf_counter()
        own = replace(runner, model=reference).last_logits(prompts, prefix)
        del reference
        _free()
        back, back_tokenizer = load_back(path, torch.float32)
        back = back.to(device)
        loaded = replace(runner, model=back).last_logits(prompts, prefix)
        matches = chat_encoding_matches(back_tokenizer, cfg.model, adapter, texts, prompts)
        del back, back_tokenizer
        _free()
        results[qtype] = {
            "file": path.name,
            "type": qtype,
            "bytes": summary["bytes"],
            "sha256": summary["sha256"],
            "written_from": "source GGUF" if source is not None else "edited model",
            "tensors": summary["n_tensors"],
            "tensors_replaced": len(summary["replaced"]) if source is not None else summary["n_tensors"],
            "tensor_types": summary["types"],
            "fallbacks": len(summary["fallbacks"]),
            "chat_encoding_matches": matches,
            "vs_intervention": _comparison(intended, loaded),
            "vs_own_weights": _comparison(own, loaded),
            "write_seconds": round(write_seconds, 2),
            "verify_seconds": round(time.perf_counter() - start, 2),
        }
        results[qtype]["passed"] = compare_next_token(intended, loaded)["mean_kl"] <= cfg.export.max_kl
        log.info("%s: %s", path.name, {k: results[qtype][k] for k in ("vs_intervention", "vs_own_weights")})
    return results


# ------------------------------------------------------------------------------------------------ stage


def card_metrics() -> dict[str, dict]:
    return {name: read_json(paths.metrics(name)) for name in CARD_METRICS if paths.metrics(name).exists()}


def run(cfg: DictConfig) -> None:
    formats = list(cfg.export.formats)
    gguf_types = list(cfg.export.gguf_types)
    check_formats(formats, gguf_types, cfg.export.check_prompts)
    saved, intervention = saved_model_dir(cfg.orthogonalize.intervention, cfg.eval.edit)
    if "gguf" in formats:
        check_gguf_model(read_json(saved / "config.json"))
    else:
        gguf_types = []
    edit_meta = read_json(saved / "edit.json")
    metrics: dict = {"formats": formats, "intervention": intervention}
    with atomic_path(paths.stage_dir("export")) as tmp:
        tmp.mkdir()
        model_bytes = copy_saved(saved, tmp, weights="safetensors" in formats)
        if "safetensors" in formats:
            metrics["safetensors"] = {"bytes": model_bytes}
        source = None
        if gguf_types:
            source = source_gguf(cfg.model.source)
            texts = instructions(read_split("data", "harmful", "test"))[: cfg.export.check_prompts]
            metrics |= {"check_prompts": len(texts), "max_kl": cfg.export.max_kl}
            metrics["gguf"] = export_gguf(cfg, intervention, saved, tmp, gguf_types, source, texts)
        write_json(paths.metrics("export"), metrics)
        failed = {q: r["vs_intervention"]["mean_kl"] for q, r in metrics.get("gguf", {}).items() if not r["passed"]}
        if failed:
            raise PipelineError(f"GGUF file(s) differ from the {intervention} intervention by more than "
                                f"export.max_kl={cfg.export.max_kl} (mean next-token KL: {failed}); see "
                                f"{paths.metrics('export')} (vs_own_weights small: quantisation of the "
                                "edited tensors; large: a conversion problem)",
                                "use a finer type (export.gguf_types=[Q8_0] or F16/F32), or raise export.max_kl "
                                "if this difference is acceptable")
        files = listing(tmp)
        sha = {r["file"]: r["sha256"] for r in metrics.get("gguf", {}).values()}
        files = [f | ({"sha256": sha[f["path"]]} if f["path"] in sha else {}) for f in files]
        card = model_card(cfg, {**card_metrics(), "export": metrics}, edit_meta, files,
                          source=source_metadata(source))
        (tmp / "README.md").write_text(card)
    log.info("export: %s", {k: v for k, v in metrics.items() if k != "gguf"})


def main() -> None:
    run_stage("export", run)


if __name__ == "__main__":
    main()
