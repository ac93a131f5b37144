"""Evaluation: feature networks (FID Inception, the domain classifier), FD/KID, evaluate mode."""
