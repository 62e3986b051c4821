"""Training: state, losses, optimizer, steps, loop."""
