"""What runs in a worker process: rankers, the chunk consumer, result writing."""
