"""Typed recipe schema, YAML loading (``defaults:`` inheritance, overrides) and validation."""

from igrpo_megatron.config.errors import LayoutError, UserError
from igrpo_megatron.config.loader import RecipeError, load_recipe, recipe_to_yaml, save_resolved_recipe

__all__ = ["LayoutError", "RecipeError", "UserError", "load_recipe", "recipe_to_yaml", "save_resolved_recipe"]
