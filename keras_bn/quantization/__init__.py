"""Quantization-aware training with BN folded into the convolution.

- `Conv2DBatchNormalization`: Conv2D and BN as one layer that trains with BN folded into a
  fake-quantized kernel (`conv2d_batch_normalization.py`);
- `prepare_qat(model)`: the model with every foldable Conv2D -> BN pair fused (`preparation.py`);
- `freeze_bn_statistics(model)`: train on the population statistics (`freezing.py`);
- `fake_quantization`: the kernel and activation grids, on `keras.quantizers`.
"""

from keras_bn.quantization.conv2d_batch_normalization import Conv2DBatchNormalization
from keras_bn.quantization.freezing import freeze_bn_statistics
from keras_bn.quantization.preparation import prepare_qat

__all__ = ["Conv2DBatchNormalization", "freeze_bn_statistics", "prepare_qat"]
