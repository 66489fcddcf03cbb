"""tether viz: the observability extension (tap, and more to come)."""
