"""Training methods. Importing this package registers every method in ``base.METHODS``."""

from ssod.training.methods import supervised  # noqa: F401
from ssod.training.methods import mean_teacher  # noqa: F401
from ssod.training.methods import efficient_teacher  # noqa: F401
