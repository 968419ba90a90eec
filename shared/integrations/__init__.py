"""Adapters that put the reward service inside the RL tools users already run.

Each module speaks one framework's reward contract and groups completions by
prompt before calling the service, because GRACE calibrates within each group
(eq. 6-7) and across the whole batch (eq. 8-9), which no framework's own
contract knows about. ``trl``: a ``reward_funcs`` callable for TRL's
``GRPOTrainer`` / ``RLOOTrainer``; ``verl``: a batch ``compute_score``.
"""
