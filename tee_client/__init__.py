"""tee-client: the trusted side of TSQP. It imports protocol and tsqp, never gpu_server."""
