"""Offline evaluation: ranking metrics of gold/recommendations on Spark (``ranking``) and the next-item
session protocol with its baselines (``sessions``). Modules are imported explicitly."""
