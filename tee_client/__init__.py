"""tee-client: the trusted side of TSQP."""

import protocol  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
