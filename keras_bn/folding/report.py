"""FoldReport: what `fold_batchnorm` folded, what it left and why, and how well it verified."""

from keras_bn.verification import DEFAULT_TOLERANCE


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
            the folded model on a random batch in inference mode; None when not compared.
        scale: the scale that error is judged against, `max(1, max|original output|)`.
        tolerance: the relative tolerance of the check (`max_error <= tolerance * scale`); None
            when nothing was checked against a tolerance (`prepare_qat`'s comparison).
        variation: how much the original's outputs vary over the verification inputs
            (`keras_bn.verification.output_variation`); a check that passes proves something
            only when this exceeds `tolerance * scale`.
        examples: the number of random inputs compared on.
        compared_with: None for a rewrite that must compute what the original computes (fold);
            else what the comparison is, for a model that differs by design (prepare_qat: "the
            float model", which fake-quantized kernels are not).
        pair_max_error: set when the outputs differ beyond the tolerance in a model that
            quantizes (QAT layers, whose rounding carries float32 differences on by whole grid
            steps) and each fold alone, its layer and BN against the folded layer on a random
            batch, is within the tolerance: the largest such relative error; else None.
        verified: True only when the outputs agree within the stated tolerance *and* vary enough
            over the inputs for a wrong rewrite to show, or, in a model that quantizes, every
            fold does alone (`pair_max_error`).
    """

    def __init__(self, model_name, folded=(), folded_before=(), left=()):
        self.model_name = model_name
        self.folded = list(folded)
        self.folded_before = list(folded_before)
        self.left = list(left)
        self.max_error = None
        self.scale = None
        self.tolerance = None
        self.variation = None
        self.examples = None
        self.compared_with = None
        self.pair_max_error = None

    @property
    def verified(self):
        """Whether the rewrite was verified: within `tolerance` on outputs that could show a
        difference."""
        if self.max_error is None or self.tolerance is None or self.compared_with is not None:
            return False
        if self.pair_max_error is not None:
            return self.pair_max_error <= self.tolerance
        return self.max_error <= self.tolerance * self.scale and not self.outputs_constant

    @property
    def outputs_constant(self):
        """Whether the original's outputs are (nearly) constant over the verification inputs:
        they vary by no more than `tolerance * scale`, so a comparison could not fail."""
        if self.variation is None:
            return False
        # A comparison without a tolerance (prepare_qat's) judges constancy at float32's.
        tolerance = DEFAULT_TOLERANCE if self.tolerance is None else self.tolerance
        return not self.variation > tolerance * self.scale

    def verification_line(self):
        """What the comparison showed, in words; None when nothing was compared."""
        if self.max_error is None:
            return None
        inputs = f"{self.examples} random inputs" if self.examples else "random inputs"
        error = f"max |difference| {self.max_error:.3g}"
        if self.compared_with is not None:
            relative = self.max_error / self.scale
            line = (f"compared with {self.compared_with}, not verified (it differs by design): "
                    f"{error} on a scale of {self.scale:.3g} ({relative:.2%}) over {inputs}")
            if self.outputs_constant:
                line += (f"; {self.compared_with}'s outputs are constant over them (vary by "
                         f"{self.variation:.3g}), so this says little")
            return line
        bound = f"tolerance {self.tolerance:g} x scale {self.scale:.3g}"
        if self.pair_max_error is not None:
            return (f"verified fold by fold: each of the {len(self.folded)} folds within "
                    f"{self.pair_max_error:.2g} of its layer and BN (tolerance "
                    f"{self.tolerance:g}); the outputs of this quantizing model differ by "
                    f"{error} > {bound} over {inputs}, rounding carried on by whole grid steps")
        if self.outputs_constant:
            return (f"NOT verified: the original's outputs are constant over {inputs} (they vary "
                    f"by {self.variation:.3g}, within {bound}), so a wrong fold could not show; "
                    f"{error}")
        return f"verified: {error} <= {bound} over {inputs}"

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
        verification = self.verification_line()
        if verification is not None:
            line += f" ({verification})"
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
            f"left={len(self.left)}, max_error={self.max_error!r}, verified={self.verified})"
        )
