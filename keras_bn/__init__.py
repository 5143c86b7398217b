"""keras-bn: Batch Normalization (Ioffe & Szegedy 2015) as a deployable part of a Keras 3 model."""

try:
    import keras  # noqa: F401  Keras imports its backend here
except ModuleNotFoundError as error:
    if error.name in (None, "keras") or error.name.startswith("keras."):
        raise
    raise ModuleNotFoundError(  # Keras is installed, its backend is not
        f"keras-bn runs on Keras, whose backend is missing ({error}). Install one: pip install "
        "tensorflow (the default backend; export needs it), or jax or torch with "
        "KERAS_BACKEND=jax / torch"
    ) from error

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
