"""Training: the loop, one optimizer step, optimizer and schedule, resume, TensorBoard and the console."""
