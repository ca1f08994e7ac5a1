"""relayd: a serial-console gateway."""

from .native import honour_pure_python_request

__version__ = "0.1.0"

honour_pure_python_request()
