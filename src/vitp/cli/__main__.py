"""`python -m vitp.cli ...` (what `torchrun -m vitp.cli pretrain ...` runs on every process)."""

import sys

from vitp.cli import main

sys.exit(main())
