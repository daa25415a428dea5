"""``python -m comfy_tetriserve``: the same as the ``comfy-tetriserve`` console script."""
from .cli import main

raise SystemExit(main())
