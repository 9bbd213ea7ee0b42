"""ResCLIP (placeholder while the readout is written)."""
