import sys

from gpu_server.cli import main

sys.exit(main())
