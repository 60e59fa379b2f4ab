"""The worker process: runs tasks the daemon hands it (``python -m deathstar.worker``)."""
