"""Inference: the core that predicts and vocodes, and the thin Synthesizer over it."""
