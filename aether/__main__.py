"""``python -m aether``: see ``aether.main``.

@.architecture
role: module entry point
jobs: [server_startup]
"""

import sys

from aether.main import main

sys.exit(main())
