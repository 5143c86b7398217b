"""FoldReport: what `fold_batchnorm` folded, what it left and why, and how well it verified."""


class FoldReport:
    """What `keras_bn.fold_batchnorm` did to one model.

    Attributes:
        model_name: the name of the folded model.
        folded: list of `(bn_layer_name, layer_name)`: each BN removed and the layer whose
            weights now carry it. A BN inside a nested model is named `"inner/bn_name"`.
        folded_before: the names (as in `folded`) of the BN layers that went into the layer
            *after* them (BN -> conv with VALID padding or a 1x1 kernel) rather than before.
        left: list of `(bn_layer_name, reason)`: each BN kept, and why.
        max_error: the largest absolute difference between the outputs of the original and
            the folded model on a random batch in inference mode; None when not verified.
        scale: the scale that error is judged against, `max(1, max|original output|)`.
        tolerance: the relative tolerance it passed (`max_error <= tolerance * scale`).
    """

    def __init__(self, model_name, folded=(), folded_before=(), left=()):
        self.model_name = model_name
        self.folded = list(folded)
        self.folded_before = list(folded_before)
        self.left = list(left)
        self.max_error = None
        self.scale = None
        self.tolerance = None

    @property
    def total(self):
        """How many BatchNormalization layers the model had."""
        return len(self.folded) + len(self.left)

    def summary_line(self):
        """The one line logged per model."""
        line = (
            f"folded {len(self.folded)} of {self.total} BatchNormalization layers "
            f"in model {self.model_name!r}"
        )
        if self.max_error is not None:
            line += f" (verified: max |difference| {self.max_error:.3g}, scale {self.scale:.3g})"
        return line

    def __str__(self):
        lines = [self.summary_line()]
        before = set(self.folded_before)
        for bn_name, layer_name in self.folded:
            side = "the following" if bn_name in before else "the preceding"
            lines.append(f"  folded {bn_name} into {side} layer {layer_name}")
        for bn_name, reason in self.left:
            lines.append(f"  left   {bn_name}: {reason}")
        if self.max_error is None:
            lines.append("  not verified (verify=False)")
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"FoldReport(model_name={self.model_name!r}, folded={len(self.folded)}, "
            f"left={len(self.left)}, max_error={self.max_error!r})"
        )
