"""Recipes that build refusal model organisms (registered as model aliases)."""
