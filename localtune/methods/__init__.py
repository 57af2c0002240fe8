"""One small module per training method: a loss (and batch shaping where special)."""
