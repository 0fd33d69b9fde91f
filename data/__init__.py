"""Synthetic-detector event generators and small sample files."""
