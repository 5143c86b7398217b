"""Folding inference-mode BN into the neighbouring conv or dense layer.

- `fold_batchnorm(model, verify=True)`: a new model without the BN that fold (`graph.py`);
- `FoldReport`: what folded into what, what was left and why (`report.py`);
- `inference_affine(bn_layer)`: inference BN as `y = a * x + b` (`layouts.py`);
- `arrays`: the float64 fold maths, one function per kernel layout.

The checks before and after a fold live in `keras_bn.verification`, which export shares.
"""

from keras_bn.folding.graph import fold_batchnorm
from keras_bn.folding.layouts import inference_affine
from keras_bn.folding.report import FoldReport

__all__ = ["FoldReport", "fold_batchnorm", "inference_affine"]
