"""gpu-server: the untrusted, accelerator side of TSQP."""
