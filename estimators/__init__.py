"""Pure estimators on polars frames: energy integration, STEP, PRE, baselines."""
