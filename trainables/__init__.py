"""What runs inside a trial. Every trainable module exposes `run_trial` and `tune_trainable`."""
