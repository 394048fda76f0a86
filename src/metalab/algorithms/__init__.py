"""Meta-learning algorithms: one module per family, all behind `MetaLearner`."""
