"""Recommenders. Spark-side models implement ``Recommender``; torch modules live beside them and hold
nothing about Spark."""
