"""The method: self-influence (exact, batched; per_sample_grads.py is its engine), PRESENCE weights and
temperature schedules (reweighting.py), and the update of one training step (presence_step.py,
train_step.py)."""
