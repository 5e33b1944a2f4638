"""ccluster: convex clustering for weakly supervised video action recognition and localization.

Fused C++/CUDA operators (registered as ``torch.ops.ccluster.*``) for the exemplar log-sum-exp, the
convex clustering loss and the representativeness (Q) fit, plus the exemplar database and test-time
selection built on them, and exemplar losses of our own that do not collapse the attention
(:mod:`ccluster.exemplar_losses`). See the README for the method and a quick start.
"""
from . import reference
from .database import ExemplarDatabase
from .exemplar_losses import (AttentionPriorLoss, ClassContrastiveLoss, attention_prior_loss,
                              attention_prior_target, class_contrastive_loss, exemplar_cross_entropy)
from .fit import FitResult, fit_representativeness
from .loss import ConvexClusteringLoss
from .ops import convex_clustering_loss, exemplar_logsumexp, fit_step, has_compiled_ops
from .selection import Selection, select_representative
from .settings import get_kernel_settings, kernel_settings, set_kernel_settings

__all__ = [
    "reference",
    "has_compiled_ops",
    "exemplar_logsumexp",
    "convex_clustering_loss",
    "fit_step",
    "ConvexClusteringLoss",
    "exemplar_cross_entropy",
    "class_contrastive_loss",
    "ClassContrastiveLoss",
    "attention_prior_target",
    "attention_prior_loss",
    "AttentionPriorLoss",
    "fit_representativeness",
    "FitResult",
    "ExemplarDatabase",
    "Selection",
    "select_representative",
    "kernel_settings",
    "get_kernel_settings",
    "set_kernel_settings",
]
__version__ = "0.1.0"
