"""The policies shipped with vtprune (each registers itself by name)."""
from .pitome import PiToMe
from .tome import ToMe

__all__ = ["PiToMe", "ToMe"]
