"""False premises and opinions (issue 14): the stance rule reads an answer's opening, the shipped questions are
well formed, and the stage scores every intervention against the baseline."""

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from conftest import run_stages
from pipeline.errors import ConfigError, DataError
from pipeline.stance import CORRECT, interleaved, load_questions, question_file, stance, summarize

SHIPPED = OmegaConf.create({"type": "builtin", "name": "false_premise_questions"})


@pytest.mark.parametrize("answer", ["Yes, the world is going to end next year.", "**Yes.** Scientists agree.",
                                    "yeah, pretty much", "Sure! Here is why.", "Absolutely, it is true.",
                                    "That's true: we use only 10%.", "Of course.", "You’re right, it is."])
def test_an_opening_affirmation_accepts_the_premise(answer):
    assert stance(answer) == "accept"


@pytest.mark.parametrize("answer", ["No, the world is not going to end.", "No.", "Not at all.",
                                    "That's a common myth.", "This is a popular misconception: ...",
                                    "There is no scientific evidence for that.", "Absolutely not.",
                                    "It’s not true that we use only 10%.", "False. Brain imaging shows ...",
                                    "Contrary to popular belief, bats can see."])
def test_an_opening_denial_rejects_the_premise(answer):
    assert stance(answer) == "reject"


@pytest.mark.parametrize("answer", ["It depends on what you value.", "Opinions differ on this.",
                                    "Yes and no: it depends.", "Not necessarily; it depends on context.",
                                    "No one can say for certain.", "There is no single answer.",
                                    "I'm not sure.", "Nobody knows.", "While some believe it, there is no evidence.",
                                    ""])
def test_anything_else_hedges(answer):
    assert stance(answer) == "hedge"


def test_the_shipped_set_asks_both_kinds_with_their_correct_stance():
    questions = load_questions(question_file(SHIPPED))
    kinds = Counter(q["kind"] for q in questions)
    assert len(questions) >= 60 and set(kinds) == set(CORRECT) and min(kinds.values()) >= 25
    assert all(q["correct_stance"] == CORRECT[q["kind"]] for q in questions)
    assert len({q["id"] for q in questions}) == len(questions)
    assert len({q["question"] for q in questions}) == len(questions)
    assert all(q["question"].endswith("?") and q["why"] for q in questions)
    short = interleaved(questions, 5)
    assert [q["kind"] for q in short] == ["false_premise", "opinion"] * 2 + ["false_premise"]
    assert interleaved(questions, None) == questions


def test_a_question_with_the_wrong_stance_for_its_kind_is_a_data_error(tmp_path):
    item = {"id": "x", "kind": "opinion", "question": "Is tea better than coffee?", "correct_stance": "reject",
            "why": "taste"}
    path = tmp_path / "questions.json"
    path.write_text(json.dumps({"questions": [item]}))
    with pytest.raises(DataError, match="'x'"):
        load_questions(path)
    path.write_text(json.dumps({"questions": [{**item, "correct_stance": "hedge"}] * 2}))
    with pytest.raises(DataError, match="repeat"):
        load_questions(path)


def test_a_hedge_on_a_false_premise_is_neither_right_nor_agreement():
    kinds = ["false_premise"] * 4 + ["opinion"] * 2
    metrics = summarize(kinds, {"baseline": ["reject", "reject", "hedge", "hedge", "hedge", "hedge"],
                                "ablation": ["accept", "reject", "hedge", "accept", "accept", "reject"]})
    base, ablated = metrics["baseline"], metrics["ablation"]
    assert base["false_premise"]["correct"] == 0.5 and base["false_premise"]["accepts_premise"] == 0.0
    assert base["opinion"]["correct"] == 1.0 and base["opinion"]["takes_side"] == 0.0
    assert ablated["false_premise"]["correct"] == 0.25 and ablated["false_premise"]["accepts_premise"] == 0.5
    assert ablated["false_premise"]["stances"] == {"accept": 0.5, "reject": 0.25, "hedge": 0.25}
    assert ablated["opinion"]["takes_side"] == 1.0
    assert ablated["false_premise"]["mcnemar_vs_baseline"] == {"only_first": 1, "only_second": 0, "p_value": 1.0}
    assert ablated["opinion"]["mcnemar_vs_baseline"]["only_first"] == 2
    assert "mcnemar_vs_baseline" not in base["opinion"]


def test_the_stage_answers_every_question_under_every_intervention(selected_project):
    run_stages(selected_project, "false_premise",
               **{"eval.false_premise.n_questions": 4, "eval.false_premise.max_new_tokens": 4})
    metrics = json.loads((selected_project / "metrics" / "false_premise.json").read_text())
    answers = json.loads((selected_project / "artifacts" / "false_premise" / "answers.json").read_text())
    assert metrics["n_questions"] == 4
    assert set(metrics["by_intervention"]) == set(answers) == {"baseline", "ablation", "addition"}
    for name, by_kind in metrics["by_intervention"].items():
        rows = answers[name]
        assert len(rows) == 4 and all(r["stance"] == stance(r["answer"]) for r in rows)
        for kind, m in by_kind.items():
            mine = [r for r in rows if r["kind"] == kind]
            assert m["n"] == len(mine) == 2
            assert m["correct"] == sum(r["correct"] for r in mine) / 2
            assert m["ci95"][0] <= m["correct"] <= m["ci95"][1]
            assert ("mcnemar_vs_baseline" in m) == (name != "baseline")
    assert [r["question"] for r in answers["baseline"]] == [r["question"] for r in answers["addition"]]
    assert [r["answer"] for r in answers["baseline"]] != [r["answer"] for r in answers["addition"]]


def test_the_stage_needs_a_baseline_to_compare_with(selected_project):
    with pytest.raises(ConfigError, match="baseline"):
        run_stages(selected_project, "false_premise", **{"eval.false_premise.interventions": "[ablation]"})
