"""Everything MLflow and Optuna storage: params, runs, logging, reuse."""
