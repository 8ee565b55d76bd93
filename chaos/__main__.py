"""``python -m chaos``: the chaos suite (see :mod:`chaos.run`)."""

from chaos.run import main

raise SystemExit(main())
