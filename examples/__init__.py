"""The three workloads of the original deathstar talk, in Python."""
