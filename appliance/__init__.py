"""Appliance image builder for an encrypted, resilient e-mail cluster."""
