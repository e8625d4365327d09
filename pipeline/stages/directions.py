"""Stage ``directions``: candidate refusal directions by difference in means.

``r[pos, layer] = mean(harmful) - mean(harmless)`` for every post-instruction position and residual
site, shape ``[positions, n_layers + 1, d_model]``. Unnormalised: its norm is the size of the shift,
which activation addition uses as is.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.io import load_tensors, read_json, save_tensors, write_json


def difference_in_means(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    return harmful_mean - harmless_mean


def run(cfg: DictConfig) -> None:
    src = paths.stage_dir("activations")
    means = load_tensors(src / "means.safetensors")
    candidates = difference_in_means(means["harmful_mean"], means["harmless_mean"])
    out = paths.stage_dir("directions")
    save_tensors(out / "candidates.safetensors", {"directions": candidates})
    meta = read_json(src / "positions.json")
    meta["norms"] = [[round(float(v), 4) for v in row] for row in candidates.norm(dim=-1)]
    write_json(out / "candidates.json", meta)


def main() -> None:
    run_stage("directions", run)


if __name__ == "__main__":
    main()
