import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's own CPU kernels run channels-first Conv1D and Conv2DTranspose only with oneDNN,
# which TensorFlow turns on by itself only on some x86 CPUs (those with AVX-512); on an AVX2-only
# CPU the channels-first folding tests would fail in TensorFlow, not in the code under test.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _full_float32_precision():
    """On NVIDIA GPUs since Ampere, each backend may run float32 matrix products and convolutions
    in TF32 (a 10-bit mantissa, errors near 1e-3). The tests compare with float64 NumPy references
    of the paper's algorithms at 1e-4, so they ask for full float32 arithmetic; on a CPU this
    changes nothing."""
    backend = os.environ["KERAS_BACKEND"]
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)


_full_float32_precision()
