"""keras-bn: Batch Normalization (Ioffe & Szegedy 2015) as a deployable part of a Keras 3 model."""

from keras_bn.batch_normalization import BatchNormalization
from keras_bn.callbacks import PopulationStatistics
from keras_bn.folding import FoldReport, fold_batchnorm
from keras_bn.population import estimate_population_statistics
from keras_bn.quantization import (
    Conv2DBatchNormalization,
    DenseBatchNormalization,
    DepthwiseConv2DBatchNormalization,
    freeze_bn_statistics,
    prepare_qat,
)
from keras_bn.verification import VerificationError

__all__ = [
    "BatchNormalization",
    "Conv2DBatchNormalization",
    "DenseBatchNormalization",
    "DepthwiseConv2DBatchNormalization",
    "FoldReport",
    "PopulationStatistics",
    "VerificationError",
    "estimate_population_statistics",
    "fold_batchnorm",
    "freeze_bn_statistics",
    "prepare_qat",
]
__version__ = "0.1.0"
