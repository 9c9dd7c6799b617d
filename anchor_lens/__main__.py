"""``python -m anchor_lens`` (and ``torchrun ... -m anchor_lens -- COMMAND ...``)."""

import sys

from .cli import main

sys.exit(main())
