"""The ssod runtime: image I/O, pre/post-processing, inference backends, labeling, evaluation.

Never imports torch, so edge devices install it without torch.
"""

__version__ = "0.1.0"
