"""``python -m mini_vllm`` is the ``mini-vllm`` command."""

import sys

from mini_vllm.cli import main

sys.exit(main())
