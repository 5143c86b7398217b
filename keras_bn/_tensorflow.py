"""The TensorFlow-only pieces of the layer, imported lazily (only when the backend is TensorFlow).

Keeping them here lets `keras_bn` import without TensorFlow and keeps the generic `keras.ops` path
the single reference that the fused kernel is tested against.
"""

import tensorflow as tf


def fused_batch_norm_training(inputs, gamma, beta, epsilon, channels_first):
    """Algorithm 1 on a rank-4 tensor with TensorFlow's fused kernel (`FusedBatchNormV3`).

    One kernel computes the mini-batch statistics and normalizes; its registered gradient
    (`FusedBatchNormGradV3`) back-propagates through mu_B and sigma2_B, as Sec. 3 requires.

    Returns:
        (outputs, batch_mean, unbiased_batch_variance, count): the kernel already applies Bessel's
        correction m/(m-1) to the variance it returns (0 when m = 1); `count` is m, the number of
        values per channel, as a float32 scalar.
    """
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs,
        gamma,
        beta,
        epsilon=epsilon,
        data_format="NCHW" if channels_first else "NHWC",
        is_training=True,
    )[:3]
    channels = tf.shape(inputs, out_type=tf.int64)[1 if channels_first else 3]
    count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
    return outputs, mean, variance, count


def replicas_in_sync():
    """How many replicas a synchronized statistic sums over (1 outside a `tf.distribute`
    replica)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        # Cross-replica context: the layer is called on the whole batch.
        return 1
    return context.num_replicas_in_sync
