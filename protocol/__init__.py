"""The TSQP wire protocol shared by gpu-server and tee-client (the layout: protocol/wire.py)."""
