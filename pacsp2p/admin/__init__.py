"""Administration: the ``pacsp2p`` command line and the peer's local status endpoint."""
