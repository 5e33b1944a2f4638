"""``python -m train compare``: variants of the exemplar stages against a same-batch control, over seeds.

* :mod:`.variants`: a variant's config per seed, and which runs variants can share;
* :mod:`.comparison`: :class:`Comparison`, the runs (stage 1 once per seed, then every variant from it);
* :mod:`.summary`: mean, spread and paired intervals; the table, the figure, peers' rows.
"""
from .comparison import Comparison
from .summary import (CONTROL, METRICS, MIN_SPAN, format_summary, load_peer, parse_metrics, plot_summary, summarize,
                      summary_figure)
from .variants import (FIXED, load_variants, parse_variants, quiet, stage1_config, stage1_id, training_id,
                       variant_config)

__all__ = ["Comparison", "CONTROL", "METRICS", "MIN_SPAN", "FIXED", "format_summary", "load_peer", "parse_metrics",
           "plot_summary", "summarize", "summary_figure", "load_variants", "parse_variants", "quiet", "stage1_config",
           "stage1_id", "training_id", "variant_config"]
