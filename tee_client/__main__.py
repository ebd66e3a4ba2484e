"""python -m tee_client: the same as the tee-client command."""

import sys

from tee_client.cli import main

sys.exit(main())
