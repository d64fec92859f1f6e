"""Training methods. Importing this package registers every method in ``base.METHODS``."""

from ssod.training.methods import supervised  # noqa: F401
from ssod.training.methods import mean_teacher  # noqa: F401
from ssod.training.methods import efficient_teacher  # noqa: F401
from ssod.training.methods.two_stage import soft_teacher  # noqa: F401,E402
from ssod.training.methods.two_stage import dtg  # noqa: F401,E402
