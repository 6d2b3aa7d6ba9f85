"""Old import path of the names the tests import; the code lives in the modules of its concept.

The study template is :mod:`kcore.experiments._study`, study folders :mod:`kcore.experiments._folder`, classifier
arms and :class:`FromLayer` :mod:`kcore.experiments._arms`, g_θ fits :mod:`kcore.experiments._fits`, checkpoints
and features :mod:`kcore.experiments._features`, image sets :mod:`kcore.imagesets`. New code imports from those.
"""
from __future__ import annotations

from kcore.experiments._arms import FromLayer, TrainConfig, state_fingerprint, train_upper, unchanged
from kcore.experiments._features import pair_features, single_features
from kcore.experiments._fits import FitSettings
from kcore.experiments._folder import read_study, write_study, zip_study
from kcore.experiments._study import torch_threads
from kcore.imagesets import Normalized, study_data

__all__ = [
    "FitSettings", "FromLayer", "Normalized", "TrainConfig", "pair_features", "read_study", "single_features",
    "state_fingerprint", "study_data", "torch_threads", "train_upper", "unchanged", "write_study", "zip_study",
]
