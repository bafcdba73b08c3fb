"""vtprune-mini: small models trained on Fashion-MNIST and a held-out evaluation set, shipped with the
package, so that every policy's accuracy trade-off can be measured offline in minutes."""
from .data import CLASS_NAMES, eval_set
from .models import load

__all__ = ["CLASS_NAMES", "eval_set", "load"]
