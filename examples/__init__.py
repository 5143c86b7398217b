"""The paper's experiments and BN-Inception, as runnable scripts and importable builders.

`examples.models` builds the networks (BN-Inception, the Inception baseline, the MNIST network of
Sec. 4.1); `examples.data` loads data sets from local paths (scikit-learn digits by default);
`examples.training` holds the single training loop and the steps-to-accuracy protocol that every
script shares.
"""
