"""The built-in procedural demo dataset (outside the product path: only commands that make it import it)."""
