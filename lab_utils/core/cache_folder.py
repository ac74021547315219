"""Where genlab keeps what it makes once and reuses: ``$GENLAB_CACHE`` (default ``~/.cache/genlab``), one folder
per kind of thing.

    shapes, mnist, ...   a dataset generated or downloaded there (its name; ``lab_utils.core.data``)
    evaluators           the trained evaluators (``lab_utils.commands.evaluation.cache``)
    first_stages         the first stages ``genlab compare`` trains once (``lab_utils.commands.first_stages``)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder(kind: str) -> Path:
    """``$GENLAB_CACHE/<kind>``, or ``~/.cache/genlab/<kind>`` when the variable is not set."""
    base = os.environ.get("GENLAB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "genlab").expanduser() / kind
