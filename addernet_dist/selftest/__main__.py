"""``python -m addernet_dist.selftest`` (the tiles check launches its ranks this way)."""

import sys

from addernet_dist.selftest import main

sys.exit(main())
