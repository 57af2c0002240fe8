"""What proves a run: evaluation, the forgetting guard, contamination, provenance and policy."""
