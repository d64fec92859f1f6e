"""ssod: semi-supervised object detection, built for deployment."""

__version__ = "0.1.0"
