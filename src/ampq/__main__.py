import sys

from ampq.cli import main

sys.exit(main())
