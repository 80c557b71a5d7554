"""prefixkit.evaluation: pt-eval, generation with the runtime scored with the field's metrics.
May import the runtime and the training data loaders (plain Python); never torch."""
