"""Direction methods beside the paper's: refusal cones (Wollschläger et al., 2025), a k-dimensional subspace
found where the paper finds its direction, and COSMIC's choice from activations alone (Siu et al., 2025)."""

import contextlib
import json

import pandas as pd
import pytest
import torch

from conftest import make_tiny_project, run_stages
from pipeline.directions import agreement, cone_basis, low_similarity_layers, site_activations
from pipeline.edit import Edit, read_edit
from pipeline.errors import ConfigError
from pipeline.interventions import apply
from pipeline.stages.activations import mean_activations, site_means


def test_the_cone_starts_with_the_paper_direction_and_adds_the_leading_principal_directions():
    torch.manual_seed(0)
    d = 16
    direction = torch.zeros(d)
    direction[0] = 3.0
    # offsets: spread mostly along axis 1, then axis 2, a little noise elsewhere, all shifted along axis 0
    offsets = torch.randn(200, d) * 0.01
    offsets[:, 0] += 3.0
    offsets[:, 1] += torch.randn(200) * 2.0
    offsets[:, 2] += torch.randn(200) * 1.0
    basis = cone_basis(direction, offsets, 3)
    torch.testing.assert_close(basis[0], direction)  # unnormalised: activation addition adds it as is
    assert torch.allclose(basis[1:] @ basis[1:].T, torch.eye(2), atol=1e-5)  # unit, mutually orthogonal
    assert torch.allclose(basis[1:] @ direction, torch.zeros(2), atol=1e-5)  # orthogonal to the direction
    assert abs(float(basis[1, 1])) > 0.99 and abs(float(basis[2, 2])) > 0.99


def test_a_cone_wider_than_the_data_is_refused_with_the_largest_k_that_fits():
    offsets = torch.zeros(5, 8)
    offsets[:, 1] = torch.arange(5.0)
    direction = torch.zeros(8)
    direction[0] = 1.0
    with pytest.raises(ConfigError, match="set direction.k to at most 2"):
        cone_basis(direction, offsets, 3)


def test_per_prompt_activations_average_to_the_stored_means(tiny_lm):
    lm = tiny_lm("qwen2")
    texts = ["Name a fruit.", "Write a haiku about autumn leaves falling slowly in the park.", "What is 7 times 8?"]
    rows = site_activations(lm, texts, -1, 2, batch_size=2)
    assert rows.shape == (3, lm.d_model)
    means = mean_activations(lm, texts, batch_size=2)
    torch.testing.assert_close(rows.mean(0), means[-1, 2], atol=1e-5, rtol=1e-5)


def test_direction_cone_writes_a_k_dimensional_edit_around_the_dim_direction(tmp_path):
    project = make_tiny_project(tmp_path, ("direction=cone",), **{"direction.curve.documents": 2,
                                                                   "direction.curve.max_length": 32})
    run_stages(project, "data", "filter", "activations", "directions", "select", **{"direction.name": "dim"})
    with contextlib.chdir(project):
        paper = read_edit("select")
        run_stages(project, "select", **{"direction.name": "cone", "direction.k": 3})
        cone = read_edit("select")
    metrics = json.loads((project / "metrics" / "select.json").read_text())
    assert cone.directions.shape == (3, paper.d_model) and (cone.position, cone.layer) == (paper.position, paper.layer)
    torch.testing.assert_close(cone.direction, paper.direction)  # the same selection, the same first direction
    assert metrics["method"] == "cone" and metrics["k"] == 3 and cone.provenance["method"] == "cone"
    cosines = metrics["basis_cosine_with_dim"]
    assert cosines[0] == 1.0 and all(abs(c) < 1e-3 for c in cosines[1:])
    assert metrics["selection_seconds"] > 0
    # the cone's curve: row k ablates the first k basis vectors; k = 0 is the unedited model
    curve = pd.read_csv(project / "plots" / "select" / "cone_k.csv")
    assert list(curve.k) == [0, 1, 2, 3] and list(curve.columns) == ["k", "refusal_score", "kl", "ce", "ce_delta"]
    assert curve.kl[0] == 0 and curve.ce_delta[0] == 0 and (curve.kl[1:] > 0).all()
    assert (project / "plots" / "select" / "cone_k.png").exists()


def test_cosmic_reads_the_layers_where_harmful_and_harmless_means_differ_most():
    torch.manual_seed(0)
    harmless = torch.randn(2, 8, 16)
    harmful = harmless + 0.01 * torch.randn(2, 8, 16)
    harmful[:, 5] = -harmless[:, 5]  # opposite at layer 5
    harmful[:, 3] = harmless[:, 3] + 2 * torch.randn(2, 16)  # apart at layer 3
    harmful[:, 7] = -harmless[:, 7]  # the final norm's input is never read
    assert low_similarity_layers(harmful, harmless, share=0.1) == [5]
    assert low_similarity_layers(harmful, harmless, share=0.34) == [3, 5]
    assert agreement(harmful[:, [5]], harmless[:, [5]]) == pytest.approx(-1.0)
    assert agreement(harmless[:, [1, 2, 3]], harmless[:, [1, 2, 3]]) == pytest.approx(1.0)


@pytest.mark.parametrize("intervention", ["ablation", "addition"])
def test_candidates_stacked_into_one_pass_get_the_activations_each_gets_alone(tiny_lm, intervention):
    """COSMIC scores several candidates per forward pass, and each pass stops at the last layer it reads;
    neither may change a candidate's mean activations."""
    lm = tiny_lm("qwen2")
    texts = ["Name a fruit.", "Write a haiku about autumn leaves falling slowly in the park.", "What is 7 times 8?"]
    torch.manual_seed(0)
    directions, layer, sites = torch.randn(3, lm.d_model), 1, [1, 2]
    torch.testing.assert_close(site_means(lm, texts, 2, sites)[0], mean_activations(lm, texts, 2)[:, sites])
    with apply(lm, intervention, Edit.of(directions, layer, lm.n_layers), stacked=True):
        stacked = site_means(lm, texts, 2, sites, copies=3)
    for direction, got in zip(directions, stacked):
        with apply(lm, intervention, Edit.of(direction, layer, lm.n_layers)):
            alone = site_means(lm, texts, 2, sites)[0]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stacked[0], stacked[1])  # each copy had its own candidate


def test_direction_cosmic_chooses_without_refusal_scores_and_records_its_table(tmp_path):
    project = make_tiny_project(tmp_path)
    run_stages(project, "data", "filter", "activations", "directions")
    run_stages(project, "select", **{"direction.name": "cosmic", "direction.layer_share": 0.1})
    metrics = json.loads((project / "metrics" / "select.json").read_text())
    table = pd.read_csv(project / "artifacts" / "select" / "scores.csv")
    assert metrics["method"] == "cosmic" and metrics["selection_seconds"] > 0
    assert set(table.columns) >= {"cosmic_score", "status"} and "bypass_score" not in table.columns
    best = table[table.status == "eligible"].sort_values("cosmic_score").iloc[-1]
    assert (int(best.position), int(best.layer)) == (metrics["position"], metrics["layer"])
    assert table[table.status != "eligible"].cosmic_score.isna().all()
    assert (project / "plots" / "select" / "cosmic_score.png").exists()
    with contextlib.chdir(project):
        edit = read_edit("select")
    assert edit.provenance["method"] == "cosmic"
    assert (edit.position, edit.layer) == (metrics["position"], metrics["layer"])
