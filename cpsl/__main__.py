import sys

from cpsl.cli import main

sys.exit(main())
