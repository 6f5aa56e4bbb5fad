"""Jobs: a persistent queue of long work (training first) run by worker processes, resumable after a restart."""
