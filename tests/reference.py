"""NumPy references of the paper's Algorithms 1 and 2, and a backend-agnostic gradient helper."""

import keras
import numpy as np

EPSILON = 1e-3


def reduction_axes(shape, axis):
    return tuple(i for i in range(len(shape)) if i != axis % len(shape))


def per_channel(vector, shape, axis):
    broadcast = [1] * len(shape)
    broadcast[axis % len(shape)] = -1
    return np.reshape(vector, broadcast)


def bn_train_forward(x, gamma, beta, axis=-1, epsilon=EPSILON):
    """Algorithm 1 in float64: returns y, mu_B, biased sigma2_B and m."""
    x = x.astype("float64")
    axes = reduction_axes(x.shape, axis)
    mean = x.mean(axes, keepdims=True)
    variance = x.var(axes, keepdims=True)
    x_hat = (x - mean) / np.sqrt(variance + epsilon)
    y = per_channel(gamma, x.shape, axis) * x_hat + per_channel(beta, x.shape, axis)
    m = x.size // x.shape[axis]
    return y, mean.ravel(), variance.ravel(), m


def bn_train_backward(x, gamma, dy, axis=-1, epsilon=EPSILON):
    """The paper's backprop equations (Sec. 3): returns dx, dgamma, dbeta for upstream dy."""
    x = x.astype("float64")
    dy = dy.astype("float64")
    axes = reduction_axes(x.shape, axis)
    m = x.size // x.shape[axis]
    mean = x.mean(axes, keepdims=True)
    variance = x.var(axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(variance + epsilon)
    x_hat = (x - mean) * inv_std
    dx_hat = dy * per_channel(gamma, x.shape, axis)
    dvariance = np.sum(dx_hat * (x - mean) * -0.5 * inv_std**3, axes, keepdims=True)
    dmean = np.sum(-dx_hat * inv_std, axes, keepdims=True) + dvariance * np.sum(
        -2.0 * (x - mean), axes, keepdims=True
    ) / m
    dx = dx_hat * inv_std + dvariance * 2.0 * (x - mean) / m + dmean / m
    return dx, np.sum(dy * x_hat, axes), np.sum(dy, axes)


def bn_inference(x, gamma, beta, mean, variance, axis=-1, epsilon=EPSILON):
    """Algorithm 2, line 11:
    y = gamma / sqrt(Var + eps) * x + (beta - gamma E[x] / sqrt(Var + eps))."""
    a = gamma / np.sqrt(variance + epsilon)
    b = beta - a * mean
    return per_channel(a, x.shape, axis) * x.astype("float64") + per_channel(b, x.shape, axis)


def to_numpy(x):
    """A backend tensor (on any device: a CUDA tensor of torch too) or variable as a NumPy array."""
    return keras.ops.convert_to_numpy(x)


def training_gradients(layer, x, dy):
    """Runs `layer` in training mode; returns (y, dx, [d trainable weights]) of sum(y * dy).

    The moving statistics are updated as a training step would.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") * dy)
        dx, *dweights = tape.gradient(loss, [x, *layer.trainable_variables])
        return np.asarray(y), np.asarray(dx), [np.asarray(g) for g in dweights]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        if not layer.built:
            layer.build(x.shape)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            y, updated = layer.stateless_call(trainable, non_trainable, x, training=True)
            return jnp.sum(y.astype("float32") * dy), (y, updated)

        (_, (y, updated)), (dweights, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            trainable, jnp.asarray(x)
        )
        for variable, value in zip(layer.non_trainable_variables, updated):
            variable.assign(value)
        return np.asarray(y), np.asarray(dx), [np.asarray(g) for g in dweights]
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)  # on Keras's device
        y = layer(x, training=True)  # builds the layer, and updates the moving statistics
        loss = torch.sum(y.float() * torch.as_tensor(dy, device=y.device))
        weights = [v.value for v in layer.trainable_variables]
        dx, *dweights = torch.autograd.grad(loss, [x, *weights])
        return to_numpy(y.detach()), to_numpy(dx), [to_numpy(g) for g in dweights]
    raise NotImplementedError(f"gradient helper for backend {backend}")
