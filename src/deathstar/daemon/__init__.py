"""The node: the daemon's loop, its sockets, the supervision of its workers, its books."""
