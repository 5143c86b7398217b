"""Quantization-aware training with BN folded into the convolution.

- `FoldedBatchNormalization`: the base of the fused layers, a linear layer and its BN trained
  with BN folded into a fake-quantized kernel (`folded_batch_normalization.py`);
- `Conv2DBatchNormalization`, `DepthwiseConv2DBatchNormalization`, `DenseBatchNormalization`:
  Conv2D -> BN, DepthwiseConv2D -> BN and Dense -> BN;
- `prepare_qat(model)`: the model with every foldable Conv2D/DepthwiseConv2D/Dense -> BN
  pair fused (`preparation.py`);
- `freeze_bn_statistics(model)`: train on the population statistics (`freezing.py`);
- `fake_quantization`: the kernel and activation grids, on `keras.quantizers`.
"""

from keras_bn.quantization.conv2d_batch_normalization import Conv2DBatchNormalization
from keras_bn.quantization.dense_batch_normalization import DenseBatchNormalization
from keras_bn.quantization.depthwise_conv2d_batch_normalization import (
    DepthwiseConv2DBatchNormalization,
)
from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization
from keras_bn.quantization.freezing import freeze_bn_statistics
from keras_bn.quantization.preparation import prepare_qat

__all__ = [
    "Conv2DBatchNormalization",
    "DenseBatchNormalization",
    "DepthwiseConv2DBatchNormalization",
    "FoldedBatchNormalization",
    "freeze_bn_statistics",
    "prepare_qat",
]
