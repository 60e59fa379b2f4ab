"""Where nodes come from: providers that start daemons and name them (EC2 today)."""
