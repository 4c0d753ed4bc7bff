"""Evaluation and visual prompting of trained models."""
