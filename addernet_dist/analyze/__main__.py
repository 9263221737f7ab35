"""``python -m addernet_dist.analyze`` = ``addernet-analyze``."""

from addernet_dist.analyze.cli import main

raise SystemExit(main())
