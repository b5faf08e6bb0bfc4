"""Transport-neutral request handling: validation, targets, deadlines, costs, metrics."""
