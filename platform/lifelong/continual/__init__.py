"""Continual learning: a landing zone's ledger, the replay buffer, the CL metrics, the cycle."""
