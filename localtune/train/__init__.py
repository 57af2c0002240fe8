"""The training side: the one loop, data, adapters, processes, and the stage loop."""
