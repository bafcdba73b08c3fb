"""``python -m vtprune.evals ...`` (and ``accelerate launch -m vtprune.evals eval ...``): the ``vtprune`` CLI."""
from .cli import main

raise SystemExit(main())
