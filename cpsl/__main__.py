import sys

from cpsl.malloc import tune_malloc

tune_malloc()   # before the step allocates: glibc keeps freed memory for the next iteration (cpsl/malloc.py)

from cpsl.cli import main  # noqa: E402

sys.exit(main())
