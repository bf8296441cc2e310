"""Commands registered on the flashlens app (filled in by its issue)."""
