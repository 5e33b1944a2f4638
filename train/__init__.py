"""Training, data and evaluation for the two-stream attention model with the convex clustering loss.

The folders, in the order of the flow:

* :mod:`train.config`: the config schema (every key declared once), loading and validation;
* :mod:`train.data`: datasets of pre-extracted features, batching, standardisation, the synthetic
  benchmark, the ActivityNet-format JSON;
* :mod:`train.models`: the two-stream attention network and its weakly supervised losses;
* :mod:`train.objectives`: the exemplar objectives (``cc.loss``), one file each;
* :mod:`train.run`: one run (:class:`train.run.Run`): its context, steps, exemplar database, evaluation,
  guards, procedure and folder;
* :mod:`train.eval`: detection and classification mAP, proposals, figures (``python -m train.eval``);
* :mod:`train.compare`: variants against a same-batch control over seeds;
* :mod:`train.cli`: ``python -m train``;
* :mod:`train.common`: command-line errors, Ctrl-C, process groups, the commands' names.

In a checkout this folder is the package ``train``; installed, it is ``ccluster_train`` (setup.py), with
the console scripts ``ccluster-train`` and ``ccluster-eval``.
"""
