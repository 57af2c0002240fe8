"""The terminal UI: it reads run directories and never touches the trainer's memory."""
