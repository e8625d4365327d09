"""Analyses of the residual stream that several stages share (geometry of the refusal direction)."""
