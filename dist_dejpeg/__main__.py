"""``python -m dist_dejpeg``: the ``dist-dejpeg`` command (where the console script is not on PATH)."""

from dist_dejpeg.cli import main

raise SystemExit(main())
