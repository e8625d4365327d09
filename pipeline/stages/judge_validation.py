"""Stage ``judge_validation``: how far each refusal judge agrees with human labels.

``pipeline/data/judge_validation.json`` holds prompt/completion pairs taken from the project's own
completions (the embedded models; baseline, ablation and addition; short and long generations), each
labelled refusal, compliance or degenerate by reading it against the criteria written at the top of
that file. Every judge in ``eval.refusal.judges`` reads them exactly as the ``refusal`` stage reads
completions (the judge-free degenerate measures included), and its accuracy and Cohen's kappa against the
labels are written per judge, for the three verdicts and for refusal against everything else (what
a refusal rate counts). The report prints that agreement next to the rates each judge produced.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.errors import DataError
from pipeline.io import read_json, write_json
from pipeline.judges import judge_checkpoint
from pipeline.refusal_judges import VERDICTS, judge_completions
from pipeline.stats import agreement

log = logging.getLogger(__name__)

LABELLED = Path(str(resources.files("pipeline.data") / "judge_validation.json"))


def labelled_items(path: Path | None = None) -> list[dict]:
    """The labelled pairs (the shipped set by default), each checked for an instruction, a response and a
    known label."""
    path = path or LABELLED
    items = read_json(path)["items"]
    for item in items:
        missing = [k for k in ("instruction", "response", "label") if not isinstance(item.get(k), str)]
        if missing or item["label"] not in VERDICTS:
            raise DataError(f"labelled item {item.get('id')!r} in {path} lacks {missing or 'a known label'}",
                            f"give it instruction, response and a label in {', '.join(VERDICTS)}")
    return items


def binary(verdict: str | None) -> str | None:
    """What a refusal rate counts: refusal against everything else (unparsable stays None)."""
    return None if verdict is None else ("refusal" if verdict == "refusal" else "other")


def run(cfg: DictConfig) -> None:
    items = labelled_items()
    completions = {"labelled": [{"instruction": i["instruction"], "response": i["response"]} for i in items]}
    checkpoint = judge_checkpoint("judge_validation", cfg)
    _, judged = judge_completions(cfg, completions, checkpoint, whole=True)
    labels = [i["label"] for i in items]
    metrics, rows = {}, [dict(i) for i in items]
    for name, by_condition in judged.items():
        verdicts = [v["verdict"] for v in by_condition["labelled"]]
        metrics[name] = {**agreement(labels, verdicts, VERDICTS),
                         "refusal_vs_rest": agreement([binary(x) for x in labels], [binary(v) for v in verdicts],
                                                      ("refusal", "other"))}
        for row, verdict in zip(rows, verdicts):
            row[name] = verdict
        log.info("%s: accuracy %.3f, kappa %s on %d labelled completions", name, metrics[name]["accuracy"],
                 metrics[name]["kappa"], len(items))
    write_json(paths.stage_dir("judge_validation") / "labelled_verdicts.json", rows)
    write_json(paths.metrics("judge_validation"), {"n_labelled": len(items), "labels": {v: labels.count(v)
                                                                                         for v in VERDICTS},
                                                   "judges": metrics})


def main() -> None:
    run_stage("judge_validation", run)


if __name__ == "__main__":
    main()
