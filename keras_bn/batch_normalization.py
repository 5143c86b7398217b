"""PLACEHOLDER while the real layer is written (issue 2): behaves as Keras's layer."""
import keras


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    def __init__(self, *args, unbiased_variance=True, virtual_batch_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unbiased_variance = unbiased_variance
        self.virtual_batch_size = virtual_batch_size
