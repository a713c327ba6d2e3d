"""`python -m pipelines.cli ARGS` = `pippo ARGS` (tests, docs and Ray job entrypoints use it)."""
import sys

from pipelines.cli import main

sys.exit(main())
