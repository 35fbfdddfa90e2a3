"""What leaves the pipeline: model cards, the served model, the registry and its gate, the report."""
