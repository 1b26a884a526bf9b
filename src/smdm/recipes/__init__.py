"""Built-in sweep recipes (YAML), loaded by smdm.scaling.load_recipe."""
