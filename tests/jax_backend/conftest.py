# JAX-only paths (JAX's multi-process runtime): collected under the JAX backend, which CI runs;
# the TensorFlow pass of CI has no such paths to test.
import keras

collect_ignore_glob = [] if keras.backend.backend() == "jax" else ["*.py"]
