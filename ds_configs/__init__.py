"""DeepSpeed JSON configs shipped with safebasin (read with importlib.resources)."""
