"""`python -m benchmarks NAME|all|--list`: the same as benchmarks/run.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import main  # noqa: E402

sys.exit(main())
