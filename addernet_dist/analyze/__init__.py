"""Analyses that reproduce the paper's tables and figures on LeNet-5-BN / Fashion-MNIST.

Each sub-command prints its numbers and writes one PNG (matplotlib, Agg backend)::

    addernet-analyze table1   --out docs/figures/table1_grad_norms.png
        Table 1: l2 norm of every layer's filter gradient at the first iteration (before the
        adaptive LR scaling), AdderNet vs CNN, LeNet-5-BN on one real training batch.
    addernet-analyze weights  --adder runs/fm_adder/checkpoints/best.pt \
                              --cnn runs/fm_cnn/checkpoints/best.pt
        Figure 7: histogram of a trained layer's weights (default: the 3rd weight layer, as the
        paper), maximum-likelihood Laplace and Gaussian fits, which fits better (log-likelihood).
    addernet-analyze filters  --adder runs/fm_adder/checkpoints/best.pt \
                              --cnn runs/fm_cnn/checkpoints/best.pt
        Figure 5: the first layer's filters as images, AdderNet vs CNN, with two numbers behind
        "they share similar patterns": spatial smoothness, and how well each adder filter is
        matched by some CNN filter compared with random filters.
    addernet-analyze features --epochs 3
        Figure 1: 2-D (or --dim 3) features of a LeNet++-style net, CNN vs AdderNet.
    addernet-analyze ablation --epochs 2 --train-limit 12000
        Table 4: full-precision gradient x l2->l1 x adaptive LR, each run through addernet-train.
    addernet-analyze curves   --run AdderNet=runs/fm_adder --run CNN=runs/fm_cnn
        Learning curves (train loss, val top-1) and final accuracies side by side from
        metrics.jsonl.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``--data-root`` to use other IDX
files).

One module per figure/table (``table1``, ``weights``, ``filters``, ``features``, ``ablation``,
``curves``), trained models from ``checkpoints``, the command line in ``cli``.
"""

from addernet_dist.analyze.ablation import (
    PAPER_TABLE4_ENDS,
    ablation_overrides,
    plot_ablation,
    run_trainer,
    write_idx_subset,
)
from addernet_dist.analyze.checkpoints import (
    bn_recalibrated_top1,
    final_checkpoint,
    load_trained_model,
)
from addernet_dist.analyze.cli import build_parser, main
from addernet_dist.analyze.common import WEIGHT_TYPES, weight_layers
from addernet_dist.analyze.curves import plot_curves, run_summary
from addernet_dist.analyze.features import (
    LeNetPP,
    collect_features,
    feature_geometry,
    plot_features,
    train_features_net,
)
from addernet_dist.analyze.filters import filter_match, filter_smoothness, plot_filters
from addernet_dist.analyze.table1 import (
    PAPER_TABLE1,
    first_iteration_grad_norms,
    format_table1,
    plot_table1,
    table1,
)
from addernet_dist.analyze.weights import fit_laplace_gaussian, plot_weights

__all__ = [
    "PAPER_TABLE1",
    "PAPER_TABLE4_ENDS",
    "WEIGHT_TYPES",
    "LeNetPP",
    "ablation_overrides",
    "bn_recalibrated_top1",
    "build_parser",
    "collect_features",
    "feature_geometry",
    "filter_match",
    "filter_smoothness",
    "final_checkpoint",
    "first_iteration_grad_norms",
    "fit_laplace_gaussian",
    "format_table1",
    "load_trained_model",
    "main",
    "plot_ablation",
    "plot_curves",
    "plot_features",
    "plot_filters",
    "plot_table1",
    "plot_weights",
    "run_summary",
    "run_trainer",
    "table1",
    "train_features_net",
    "weight_layers",
    "write_idx_subset",
]
