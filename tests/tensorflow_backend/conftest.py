# TensorFlow-only paths (the fused kernel, tf.distribute): collected under the TensorFlow backend,
# which CI runs; the JAX pass of CI has no such paths to test.
import keras

collect_ignore_glob = [] if keras.backend.backend() == "tensorflow" else ["*.py"]
