"""The Hugging Face model card (``README.md``) of an exported edited model, written from the run's own numbers.

``model_card(cfg, metrics, edit_meta, files)`` renders YAML front matter (``base_model`` where the
source names one, tags, ``license: other`` standing for the base model's licence) and a Markdown body:
what was removed and how (the edit record's provenance, layer and position, the folded intervention),
the base model (hub id and revision, or the GGUF's sha256 and the PyPI packages it came from), every
figure present in the metrics files (refusal rates per condition, safety judges, CE-loss and first-token
KL changes, capability benchmarks, over-refusal, the weight-edit check, the export checks), each with
its judge and ``n`` where known, the data it was measured on, intended use and risks.

A metric whose file (or key) is missing is left out: nothing is estimated or filled in. No model
output (completions) is embedded.
"""

from __future__ import annotations

from typing import Any

import yaml
from omegaconf import DictConfig

TAGS = ["abliterated", "refusal-direction", "orthogonalized", "safety-research", "interpretability"]
SUBSTRING_JUDGE = "substring matching against the paper's refusal phrases (`eval.refusal_substrings`)"
PAPER = ("Arditi et al., *Refusal in Language Models Is Mediated by a Single Direction* (2024), "
         "[arXiv:2406.11717](https://arxiv.org/abs/2406.11717)")
BIBTEX = """@inproceedings{arditi2024refusal,
  title = {Refusal in Language Models Is Mediated by a Single Direction},
  author = {Arditi, Andy and Obeso, Oscar and Syed, Aaquib and Paleka, Daniel and Panickssery, Nina and
            Gurnee, Wes and Nanda, Neel},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2024}
}"""
HF_PREFIX = "https://huggingface.co/"


# ------------------------------------------------------------------------------------------------ formatting


def num(value: Any, signed: bool = False) -> str:
    """A metric as written in the metrics file, at most 4 significant digits (ints and strings as they are)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def size(n_bytes: int) -> str:
    """Bytes in decimal units, as the hub shows file sizes."""
    value = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n_bytes} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n_bytes} B"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _section(title: str, *parts: str) -> str:
    body = "\n\n".join(p for p in parts if p)
    return f"## {title}\n\n{body}" if body else ""


# ------------------------------------------------------------------------------------------------ base model


def _hub_id(url: str | None) -> str | None:
    """``owner/name`` of a huggingface.co model URL (or of a plain ``owner/name``)."""
    if not url:
        return None
    url = url.strip().removesuffix("/")
    if url.startswith(HF_PREFIX):
        url = url[len(HF_PREFIX):]
    parts = url.split("/")
    return url if len(parts) == 2 and all(parts) and ":" not in url else None


def base_model_id(cfg: DictConfig, source: dict) -> str | None:
    """The hub id of the base model, where the config or the source GGUF's metadata names one."""
    if cfg.model.source.type == "hub":
        return str(cfg.model.source.repo_id)
    return _hub_id(source.get("base_model_repo_url")) or _hub_id(source.get("source_repository"))


def base_model_lines(cfg: DictConfig, source: dict) -> list[str]:
    src = cfg.model.source
    lines = [f"- configuration: `{cfg.model.name}` (family `{cfg.model.family}`)"]
    if src.type == "hub":
        lines.append(f"- base model: [{src.repo_id}]({HF_PREFIX}{src.repo_id}) at revision `{src.get('revision')}`")
    elif src.type == "pypi_gguf":
        if source.get("name"):
            lines.append(f"- base model: the GGUF file `{source['name']}`")
        lines.append(f"- GGUF sha256: `{src.sha256}`")
        first, last = src.package.format(index=1), src.package.format(index=src.parts)
        lines.append(f"- from PyPI: `{first}` … `{last}` ({src.parts} wheels), version `{src.version}`, "
                     "concatenated and checked against the sha256")
        base = base_model_id(cfg, source)
        if base:
            lines.append(f"- the GGUF names its base model: [{base}]({HF_PREFIX}{base})")
    else:
        lines.append(f"- base model: a local checkpoint (`{src.type}` source)")
    return lines


# ------------------------------------------------------------------------------------------------ sections


def method_section(cfg: DictConfig, edit_meta: dict, metrics: dict) -> str:
    from pipeline.interventions import INTERVENTIONS, folded_name

    name = folded_name(cfg.orthogonalize.intervention, edit_meta.get("provenance") or {})
    doc = INTERVENTIONS[name].doc if name in INTERVENTIONS else ""
    provenance = edit_meta.get("provenance") or {}
    lines = [f"- weight edit folded into the weights: `{name}`" + (f": {doc}" if doc else "")]
    if provenance.get("method"):
        lines.append(f"- direction method: `{provenance['method']}`"
                     + (f" (written by the `{provenance['stage']}` stage)" if provenance.get("stage") else ""))
    where = []
    if edit_meta.get("layer") is not None:
        where.append(f"layer {edit_meta['layer']}" + (f" of {edit_meta['n_layers']}" if edit_meta.get("n_layers")
                                                       else ""))
    if edit_meta.get("position") is not None:
        label = f" (`{edit_meta['position_label']}`)" if edit_meta.get("position_label") else ""
        where.append(f"post-instruction position {edit_meta['position']}{label}")
    if where:
        lines.append("- direction read at " + ", ".join(where))
    if edit_meta.get("n_directions") is not None:
        kind = "one per layer" if edit_meta.get("per_layer") else "removed as one subspace"
        lines.append(f"- directions: {edit_meta['n_directions']} ({kind}), norm {num(edit_meta.get('norm'))}")
    if edit_meta.get("embedding_weight") is not None:
        lines.append(f"- embedding weight: {num(edit_meta['embedding_weight'])}")
    select = metrics.get("select") or {}
    picked = [(k, label) for k, label in (("bypass_score", "bypass score"), ("induce_score", "induce score"),
                                          ("kl", "KL on harmless validation prompts"),
                                          ("n_candidates", "candidates"), ("n_eligible", "eligible candidates"))
              if k in select]
    if picked:
        lines.append("- selection (validation prompts): " + ", ".join(f"{label} {num(select[k])}"
                                                                      for k, label in picked))
    params = provenance.get("params")
    details = ""
    if params:
        details = ("<details><summary>method parameters (from the edit record)</summary>\n\n```yaml\n"
                   + yaml.safe_dump(params, sort_keys=True).strip() + "\n```\n\n</details>")
    return _section("Method", f"Directional ablation after {PAPER}: the refusal direction is projected out of "
                    "every matrix that writes to the residual stream (the weight orthogonalization of the paper), "
                    "so the edit needs no hooks at run time.", "\n".join(lines), details)


def _condition_prompts(cfg: DictConfig) -> dict[str, tuple[str, str]]:
    conditions = cfg.eval.conditions
    return {str(k): (str(c.prompts), str(c.intervention)) for k, c in conditions.items()}


def refusal_section(cfg: DictConfig, metrics: dict) -> str:
    refusal = metrics.get("refusal") or {}
    rates = refusal.get("refusal_rate") or {}
    if not rates:
        return ""
    conditions = _condition_prompts(cfg)
    ns, cis, tests = refusal.get("n") or {}, refusal.get("ci95") or {}, refusal.get("mcnemar_vs_baseline") or {}
    rows = []
    for condition, rate in rates.items():
        prompts, intervention = conditions.get(condition, ("", ""))
        ci = cis.get(condition)
        rows.append([f"`{condition}`", prompts and f"{prompts} test", intervention and f"`{intervention}`",
                     num(rate), f"{num(ci[0])}–{num(ci[1])}" if ci else "", ns.get(condition, ""),
                     num(tests[condition]["p_value"]) if "p_value" in tests.get(condition, {}) else ""])
    judge = (refusal.get("judges") or ["substring"])[0]
    judged_by = (SUBSTRING_JUDGE if judge == "substring"
                 else f"the `{judge}` refusal judge (`eval.refusal_judges.{judge}`)")
    return ("### Refusal rate\n\nShare of greedy completions judged a refusal by " + judged_by + ", with its "
            "95% Wilson interval, and the exact McNemar test against the baseline on the same prompts.\n\n"
            + table(["condition", "prompts", "intervention", "refusal rate", "95% CI", "n", "McNemar p vs baseline"],
                    rows))


def search_section(edit_meta: dict, metrics: dict) -> str:
    """The search's chosen trial, when the exported edit came from the search stage."""
    found = metrics.get("search") or {}
    chosen = found.get("chosen") or {}
    if (edit_meta.get("provenance") or {}).get("method") != "search" or not found.get("enabled") or not chosen:
        return ""
    figures = []
    if "refusals" in chosen:
        of = f" of {found['n_harmful']}" if "n_harmful" in found else ""
        figures.append(f"{num(chosen['refusals'])}{of} harmful prompts refused")
    if "kl" in chosen:
        on = f" on {found['n_harmless']} harmless prompts" if "n_harmless" in found else ""
        figures.append(f"KL {num(chosen['kl'])}{on}")
    if "refusals" in (found.get("unedited") or {}):
        figures.append(f"unedited model: {num(found['unedited']['refusals'])} refused")
    lines = [f"- trial {chosen.get('trial', '?')} of {found.get('n_trials', '?')}"
             + (f" (`{chosen['intervention']}`)" if chosen.get("intervention") else "") + ": " + ", ".join(figures)]
    if "within_kl_budget" in chosen:
        lines.append(f"- within the KL budget: {'yes' if chosen['within_kl_budget'] else 'no'}")
    return "### Search (validation prompts)\n\nThe edit is the chosen trial of a multi-objective search over " \
           "ablation parameters (fewest refusals, least KL).\n\n" + "\n".join(lines)


def safety_section(metrics: dict) -> str:
    safety = metrics.get("safety") or {}
    rates = safety.get("safety_rate") or {}
    rows = [[f"`{judge}`", f"`{condition}`", num(rate), num((safety.get("n_invalid") or {}).get(judge, {})
                                                               .get(condition, ""))]
            for judge, by_condition in rates.items() for condition, rate in by_condition.items()]
    if not rows:
        return ""
    return ("### Safety rate (model judges)\n\nShare of completions the judge model rated safe.\n\n"
            + table(["judge", "condition", "safety rate", "invalid verdicts"], rows))


def loss_section(metrics: dict) -> str:
    loss = metrics.get("loss") or {}
    parts = []
    rows = []
    for corpus, values in (loss.get("ce_loss") or {}).items():
        for key, value in values.items():
            if key.startswith("delta_"):
                name = key[len("delta_"):]
                rows.append([corpus.replace("_", " "), f"`{name}`", num(values.get("ce_baseline", "")),
                             num(value, signed=True), values.get(f"n_sequences_{name}", values.get("n_sequences", ""))])
    if rows:
        parts.append("Cross-entropy loss (nats per token) of the unedited model and its change under each "
                     "intervention (on the same documents): general text, and the model's own completions of harmless "
                     "test prompts.\n\n"
                     + table(["text", "intervention", "baseline CE", "change", "n sequences"], rows))
    kl = loss.get("kl_harmless_test") or {}
    if kl:
        n = (metrics.get("data") or {}).get("harmless_test", "")
        parts.append("First-token KL divergence (unedited ‖ intervened) of the next-token distribution at the end "
                     "of each harmless test prompt.\n\n"
                     + table(["intervention", "mean KL", "n prompts"], [[f"`{k}`", num(v), n] for k, v in kl.items()]))
    return "### Language modelling\n\n" + "\n\n".join(parts) if parts else ""


def capabilities_section(metrics: dict) -> str:
    cap = metrics.get("capabilities") or {}
    rows = [[f"`{task}`", metric, num(v.get("original", "")), num(v.get("orthogonalized", "")),
             num(v["delta"], signed=True) if "delta" in v else ""]
            for task, by_metric in (cap.get("tasks") or {}).items() for metric, v in by_metric.items()]
    if not rows:
        return ""
    how = {"saved": "the saved edited weights", "hooks": "the intervention applied to the original model"}
    note = f" The edited side is {how[cap['edited_model']]}." if cap.get("edited_model") in how else ""
    return ("### Capabilities\n\nlm-eval benchmarks, original model against the edited one." + note + "\n\n"
            + table(["task", "metric", "original", "edited", "change"], rows))


def over_refusal_section(metrics: dict) -> str:
    over = metrics.get("over_refusal") or {}
    rates = over.get("refusal_rate") or {}
    if not rates:
        return ""
    n = over.get("n_prompts", "")
    return ("### Over-refusal\n\nBenign prompts that look sensitive; refusal judged by " + SUBSTRING_JUDGE + ".\n\n"
            + table(["intervention", "refusal rate", "n prompts"], [[f"`{k}`", num(v), n] for k, v in rates.items()]))


def orthogonalize_section(cfg: DictConfig, metrics: dict) -> str:
    ortho = metrics.get("orthogonalize") or {}
    if "mean_kl_vs_hooks" not in ortho:
        return ""
    harmful = (metrics.get("data") or {}).get("harmful_test")
    n = f" on {min(cfg.orthogonalize.check_prompts, harmful)} harmful test prompts" if harmful else ""
    figures = [f"mean KL {num(ortho['mean_kl_vs_hooks'])}"]
    if "top1_agreement" in ortho:
        figures.append(f"top-1 agreement {num(ortho['top1_agreement'])}")
    if "max_abs_logit_diff" in ortho:
        figures.append(f"largest logit difference {num(ortho['max_abs_logit_diff'])}")
    return (f"### Weight edit against the intervention\n\nNext-token distributions of the edited weights "
            f"against `{ortho.get('intervention', 'the intervention')}` applied by hooks to the original model{n}: "
            + ", ".join(figures) + ".")


def export_section(metrics: dict) -> str:
    export = metrics.get("export") or {}
    ggufs = export.get("gguf") or {}
    if not ggufs:
        return ""
    rows = []
    for r in ggufs.values():
        vi, vo = r.get("vs_intervention") or {}, r.get("vs_own_weights") or {}
        rows.append([f"`{r['file']}`", r["type"], r.get("tensors_replaced", ""), num(vi.get("mean_kl", "")),
                     num(vi.get("top1_agreement", "")), num(vo.get("mean_kl", "")), num(vo.get("top1_agreement", ""))])
    n = export.get("check_prompts", "")
    return ("### GGUF files\n\nEach file was read back (transformers' GGUF loader, float32) and its next-token "
            f"distributions on {n} harmful test prompts compared with the intervention on the original model "
            "(*vs intervention*: edit and file rounding together) and with the edited weights rounded the way the "
            "file stores them (*vs own weights*: the file read back; near 0 means it holds exactly those weights)."
            + (f" The export fails above a mean KL of {num(export['max_kl'])} against the intervention."
               if "max_kl" in export else "") + "\n\n"
            + table(["file", "type", "tensors written from the edit", "KL vs intervention", "top-1",
                     "KL vs own weights", "top-1"], rows))


def data_section(cfg: DictConfig, metrics: dict) -> str:
    data = metrics.get("data") or {}
    lines = [f"- data configuration: `{cfg.data.name}`"]
    rows = [[side] + [data.get(f"{side}_{split}", "") for split in ("train", "val", "test")]
            for side in ("harmful", "harmless") if any(f"{side}_{s}" in data for s in ("train", "val", "test"))]
    split_table = table(["instructions", "train", "val", "test"], rows) if rows else ""
    return _section("Data", "The direction was computed on the train split, chosen on the validation split, and "
                    "every figure above was measured on the test split (disjoint from both).", "\n".join(lines),
                    split_table)


def files_section(files: list) -> str:
    rows = []
    for f in files:
        entry = f if isinstance(f, dict) else {"path": str(f)}
        rows.append([f"`{entry['path']}`", size(entry["bytes"]) if "bytes" in entry else "",
                     f"`{entry['sha256']}`" if entry.get("sha256") else ""])
    return _section("Files", table(["file", "size", "sha256"], rows)) if rows else ""


def usage_section(files: list) -> str:
    names = [f["path"] if isinstance(f, dict) else str(f) for f in files]
    parts = []
    if "config.json" in names:
        parts.append("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     "tokenizer = AutoTokenizer.from_pretrained(\"<this repository>\")\n"
                     "model = AutoModelForCausalLM.from_pretrained(\"<this repository>\")\n```")
    ggufs = [n for n in names if n.endswith(".gguf")]
    if ggufs:
        parts.append(f"The GGUF files run in llama.cpp, Ollama or LM Studio, e.g. `llama-cli -m {ggufs[0]}`. "
                     "They carry the tokenizer and chat template.")
    parts.append("The edit record (`edit/edit.safetensors`, `edit/edit.json`) holds the removed direction(s) and "
                 "their provenance.")
    return _section("How to use", *parts)


RISKS = """**This model no longer refuses harmful requests.** Its refusal behaviour was removed on purpose,
for research; it will follow instructions that the base model declines, including requests for harmful,
dangerous or illegal content. The other safety properties of the base model are not measured here beyond the
figures above.

- Do not deploy it to end users or put it behind a public interface.
- Do not use it to produce content that harms people; you are responsible for what you generate.
- The base model's licence and acceptable-use policy still apply to this derivative: obey them."""

INTENDED_USE = """Research on refusal mechanisms and on how safety behaviour is represented in language models;
evaluation of safety interventions, judges and defences (for example, measuring how much a defence depends on
the refusal direction); reproducing the paper's results. Not intended for any product, for chatting with
end users, or for generating content."""


def model_card(cfg: DictConfig, metrics: dict[str, dict], edit_meta: dict, files: list,
               source: dict | None = None) -> str:
    """The model card Markdown (with YAML front matter) of an export.

    ``metrics``: the metrics files' contents by stage name (``refusal``, ``loss``, ``export`` ...; any may
    be missing). ``edit_meta``: the edit record's ``edit.json``. ``files``: what the export folder holds,
    each ``{"path", "bytes", "sha256"?}`` (or a path). ``source``: ``general.*`` metadata of the source
    GGUF, if the model came from one.
    """
    source = source or {}
    names = [f["path"] if isinstance(f, dict) else str(f) for f in files]
    from pipeline.interventions import folded_name

    intervention = folded_name(cfg.orthogonalize.intervention, edit_meta.get("provenance") or {})
    front: dict[str, Any] = {}
    base = base_model_id(cfg, source)
    if base:
        front["base_model"] = base
    front["license"] = "other"
    front["tags"] = TAGS + [str(intervention).replace("_", "-")] + (["gguf"] if any(n.endswith(".gguf")
                                                                                     for n in names) else [])
    if "config.json" in names:
        front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"
    header = ("---\n" + yaml.safe_dump(front, sort_keys=False).strip()
              + "\n# license: other = the base model's licence applies (see Licence); set license/license_name to "
                "the base model's before publishing\n---")

    title = f"# {cfg.model.name}, refusal direction removed (`{intervention}`)"
    summary = (f"`{cfg.model.name}` with its refusal direction removed from the weights by `{intervention}`, made "
               "with the refusal-direction pipeline after " + PAPER + ". Every figure on this card is copied from "
               "the run's metrics files; figures that were not measured are left out.")
    results = "\n\n".join(s for s in (
        search_section(edit_meta, metrics), refusal_section(cfg, metrics), safety_section(metrics),
        loss_section(metrics), capabilities_section(metrics),
        over_refusal_section(metrics), orthogonalize_section(cfg, metrics), export_section(metrics)) if s)
    sections = [
        header, title, summary,
        "> [!WARNING]\n> This model no longer refuses harmful requests. It is for research on refusal and safety "
        "interventions, not for deployment to end users. See *Risks and limitations*.",
        _section("Base model", "\n".join(base_model_lines(cfg, source))),
        method_section(cfg, edit_meta, metrics),
        _section("Evaluation", results),
        data_section(cfg, metrics),
        _section("Intended use", INTENDED_USE),
        _section("Risks and limitations", RISKS),
        _section("Licence", "`license: other` stands for the base model's licence, which applies unchanged to this "
                 "derivative; read it (and any acceptable-use policy) on the base model's page before use."),
        usage_section(files),
        files_section(files),
        _section("Citation", "```bibtex\n" + BIBTEX + "\n```"),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"
