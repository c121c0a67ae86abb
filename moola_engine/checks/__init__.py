"""Proofs that a run did what it promised: load proofs, weight-delta and gradient-flow checks, verify, red flags."""
