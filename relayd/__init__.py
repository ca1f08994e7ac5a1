"""relayd: a serial-console gateway."""

__version__ = "0.1.0"
