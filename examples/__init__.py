"""The paper's experiments and BN-Inception, as importable modules and scripts run as modules.

Building blocks, one concept each:

- `examples.models`: the networks (BN-Inception, the Inception baseline, the MNIST network of
  Sec. 4.1).
- `examples.data`: data sets from local paths (scikit-learn's digits by default).
- `examples.variants`: the paper's training variants (Sec. 4.2.1) and `build_variant`.
- `examples.devices`: the local devices and data parallelism over them.
- `examples.history`: what a training run records (`History`) and a protocol's checkpoint
  (`RunLog`).
- `examples.training`: `Config` and the single training loop, `train_and_track`.
- `examples.protocol`: the steps-to-accuracy protocol of Figure 3 (`steps_to_accuracy`).
- `examples.reporting`: JSON, plots and tables on disk; `examples.cli`: the scripts' options.

Scripts, run from the repository root: `python -m examples.demo`, `python -m examples.figure1`,
`python -m examples.train_inception` (each with `--help`).
"""
