"""`python -m scripts.bench [--quick]` from the repository root."""

import sys

from scripts.bench.main import main

sys.exit(main())
