"""One module per DVC stage; each exposes ``run(cfg)`` and is called as ``python -m pipeline.stages.<name>``."""

STAGES = ("data", "filter", "activations", "directions", "select", "search", "projections", "categories",
          "completions", "refusal", "judge_validation", "delayed_refusal", "safety", "loss", "orthogonalize",
          "capabilities", "over_refusal", "false_premise", "export", "suffix", "geometry", "heads", "report")
