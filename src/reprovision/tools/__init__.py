"""Tools around the pipeline, run by a person or `make`, never imported by a stage."""
