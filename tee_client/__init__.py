"""tee-client: the trusted side of TSQP."""
