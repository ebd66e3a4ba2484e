import sys

from tee_client.cli import main

sys.exit(main())
