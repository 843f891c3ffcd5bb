"""Inference: probabilities from a model (one Predictor for every caller) and test-time augmentation."""
