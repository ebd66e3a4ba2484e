"""tee-client: the trusted side of TSQP."""

import os

# Client and server take turns (every call is synchronous); on one host, OpenMP threads that
# spin while waiting steal the other side's cores. Passive waiting halved a CPU prefill here.
# Set before torch loads; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
