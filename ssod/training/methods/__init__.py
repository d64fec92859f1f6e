"""Training methods. Importing this package registers every method in ``base.METHODS``."""

from ssod.training.methods import supervised  # noqa: F401
