"""python -m gpu_server: the same as the gpu-server command."""

import sys

from gpu_server.cli import main

sys.exit(main())
