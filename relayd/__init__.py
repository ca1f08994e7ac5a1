"""relayd: a serial-console gateway."""

from .native import select_implementation

__version__ = "0.1.0"

select_implementation()
