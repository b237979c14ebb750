"""Spark transforms from raw event files to the bronze and silver tables."""
