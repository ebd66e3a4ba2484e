"""What gpu-server and tee-client share: settings, the checkpoint loader, the linear engine,
the method table and the ring arithmetic of the privacy modes. Imports neither side."""
