"""Container processes: the init process, exec'd processes, and the state table they share."""
