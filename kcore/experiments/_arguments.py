"""The command-line options that several studies share (each study adds its own as well).

The options that the dashboard may set, and their caps, are read from the parsers these build
(:mod:`kcore.study_options`); the settings they describe are built by :func:`kcore.experiments._fits.fit_settings_from`
and :func:`kcore.experiments._arms.train_config_from`.
"""
from __future__ import annotations

import argparse

from kcore.conventions import CONVENTIONS
from kcore.data import BUNDLED_DATA
from kcore.training import OPTIMIZERS


def add_output_arguments(p: argparse.ArgumentParser, *, metavar: str = "RUN_DIR",
                         help: str = "study folder to write (atomically)",
                         overwrite_help: str = "replace RUN_DIR if it exists") -> None:
    """``--threads``, ``--overwrite`` and ``--out``: the options of every command that writes a folder."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--out", required=True, metavar=metavar, help=help)


def add_fit_args(p: argparse.ArgumentParser, *, n_train: int, train_help: str) -> None:
    """The options of the images and of g_θ (compression, distillation, cross-task).

    Args:
        p: the study's parser.
        n_train: default of ``--n-train``.
        train_help: what the training images train, for the help (e.g. ``"of every generation"``).
    """
    add_data_argument(p)
    p.add_argument("--n-train", type=int, default=n_train, help=f"training images {train_help} (default {n_train})")
    p.add_argument("--n-test", type=int, default=500, help="test images for the accuracies (default 500)")
    p.add_argument("--n-images", type=int, default=300, metavar="N",
                   help="images whose features g_theta is fitted on (20%% held out for the numbers; default 300)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="highest order K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.1, metavar="L", help="lambda of Eq. 2 (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=10, metavar="E", help="epochs of each g_theta fit (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and fits (default 0)")


NESTED_HELP = ("fit the orders as nested models g_0 (least squares) ... g_K, each from the one before with its new gate "
               "at 0 (linear gates), and report the order-wise gains R2(g_k) - R2(g_k-1) with 95 percent intervals beside "
               "the split of g_K (gain_d0 ... gain_dK, gain_instability columns); costs about 1.3-1.8x the fits")


def add_nested_argument(p: argparse.ArgumentParser) -> None:
    """``--nested``: the studies that report an order split can fit nested models and report their gains."""
    p.add_argument("--nested", action="store_true", help=NESTED_HELP)


def add_recipe_args(p: argparse.ArgumentParser, *, epochs: int, nets: str) -> None:
    """``--arch --epochs --lr --optimizer --weight-decay --image-size --layer`` of networks trained by a study.

    Args:
        p: the study's parser.
        epochs: default of ``--epochs``.
        nets: which networks, for the help (e.g. ``"each net trained here"``).
    """
    p.add_argument("--arch", default="kc_resnet", help=f"architecture of {nets} (default kc_resnet)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs of {nets} (default {epochs})")
    p.add_argument("--lr", type=float, default=0.1, help=f"peak learning rate of {nets} (default 0.1)")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help=f"optimiser of {nets} (default sgd; the sample models use adamw with --lr 0.003 "
                   "--weight-decay 0.0001)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default 0.0005)")
    p.add_argument("--image-size", type=int, default=32, help=f"image size of {nets} (default 32)")
    p.add_argument("--layer", default=None, help="layer to compare (default: the card's default_layer, or layer2)")

def add_data_argument(p: argparse.ArgumentParser, *, default: str = BUNDLED_DATA, help: str = "") -> None:
    """``--data``: the bundled kshapes images (``kshapes``; ``sample`` is a deprecated alias) or a folder."""
    p.add_argument("--data", default=default, metavar=f"{BUNDLED_DATA}|DIR",
                   help=help or f"'{BUNDLED_DATA}' (the bundled images, default) or a folder DIR with "
                   "DIR/train/<class>/* and DIR/test/<class>/* images")


def add_pair_arguments(p: argparse.ArgumentParser, names: tuple[str, str], defaults: tuple[str, str],
                       what: tuple[str, str]) -> None:
    """``--<name> CKPT`` and ``--layer-<name>`` for the two networks of a study (e.g. ``("a", "b")``)."""
    for name, default, desc in zip(names, defaults, what):
        p.add_argument(f"--{name}", default=default, metavar="CKPT", help=f"{desc} (default {default})")
    for name, desc in zip(names, what):
        p.add_argument(f"--layer-{name}", default=None, help=f"layer of {desc} (default: its card's default layer)")


def add_training_arguments(p: argparse.ArgumentParser, *, epochs: int, lr: float, lr_final: float, n_train: int,
                           convention: str) -> None:
    """Options of the classifier arms and of g_θ (diagnosis and refinement)."""
    add_data_argument(p)
    p.add_argument("--n-train", type=int, default=n_train, metavar="N",
                   help=f"training images for g_theta and the classifiers (default {n_train})")
    p.add_argument("--n-test", type=int, default=500, metavar="N", help="test images (default 500)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="lambda of g_theta (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=15, metavar="E", help="epochs of g_theta (default 15)")
    p.add_argument("--convention", choices=list(CONVENTIONS), default=convention,
                   help=f"normalisation of g_theta's input and target (default {convention}; see kcore.conventions)")
    p.add_argument("--epochs", type=int, default=epochs, metavar="E", help=f"epochs of every classifier arm "
                   f"(default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate of the arms (default {lr:g}), "
                   f"falling log-linearly to --lr-final")
    p.add_argument("--lr-final", type=float, default=lr_final, help=f"last epoch's learning rate "
                   f"(default {lr_final:g})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of g_theta and of the arms' batch order")
