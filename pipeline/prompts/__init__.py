"""Making prompt inputs: a dataset recipe (classes × templates × slots) → a labelled prompts Parquet."""
