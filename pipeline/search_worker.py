"""One more worker for a running search: ``python -m pipeline.search_worker [overrides]``.

Workers share one study through Optuna's RDB storage (its own distributed mode: each worker asks the
storage for the next trial and writes its result there). Start them with any Hydra launcher, from the
project root, with the same settings as the ``search`` stage and a database every worker can reach:

    python -m pipeline.search_worker -m search=optuna search.storage=postgresql://host/db \\
        search.study_name=qwen-search-1 +worker=range(4) hydra/launcher=slurm     # or hydra/launcher=parallel

Each runs trials until the study holds ``search.n_trials`` complete ones; then ``dvc repro search``
(same storage and study name) finds them done and writes the outputs.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.cli import setup_logging
from pipeline.config import CONF_DIR
from pipeline.runtime import apply_threads, set_weight_first_rows
from pipeline.stages.search import work


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> int:
    setup_logging()
    apply_threads(cfg.runtime.threads)
    set_weight_first_rows(cfg.runtime.weight_first_rows)
    return work(cfg)[2]


if __name__ == "__main__":
    main()
