"""``python -m genlab train ...`` is ``genlab train ...``; torchrun starts it with ``-m genlab``."""

from lab_utils.commands.cli import main

raise SystemExit(main())
