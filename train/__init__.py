"""Training, data and evaluation for the two-stream attention model with the convex clustering loss."""
