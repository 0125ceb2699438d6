"""`python -m agentloop` is the `agentloop` command."""

import sys

from agentloop.cli import main

sys.exit(main())
