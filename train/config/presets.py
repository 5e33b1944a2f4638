"""Built-in presets: partial config trees over the defaults (:mod:`train.config.schema`)."""
from __future__ import annotations

# Partial trees over the defaults. configs/synthetic.yaml and configs/tiny.yaml hold the
# same values (a test checks it); `python -m train demo` uses PRESETS["synthetic"] so that it works from
# an installed package too.
PRESETS: dict[str, dict] = {
    "synthetic": {
        "name": "synthetic",
        "data": {"synthetic": "demo", "layout": "native", "batch_size": 8, "max_seqlen": 100},
        "model": {"embed_dim": 128, "dropout": 0.5, "attention": "stpn"},
        "cc": {"rounds": 2, "size": 32, "k": 4, "fit_max_iter": 200},
        "train": {"lr": 1.0e-3, "baseline_steps": 200, "cc_steps": 100, "checkpoint_every": 1,
                  "log_every": 10},
        "eval": {"figures": 4},
        "run": {"threads": 1},
    },
    "tiny": {
        "name": "tiny",
        "data": {"synthetic": "tiny", "layout": "native", "batch_size": 4, "max_seqlen": 64},
        "model": {"embed_dim": 16, "dropout": 0.1},
        "cc": {"rounds": 1, "size": 8, "k": 2, "fit_max_iter": 100},
        "train": {"lr": 1.0e-3, "baseline_steps": 6, "cc_steps": 4, "log_every": 2},
        "eval": {"figures": 1},
        "run": {"progress": False, "tensorboard": False, "threads": 1},
    },
}
