"""What every stage stands on: params and device checks, runtime, checkpoints, tracking, DDP, graphs."""
