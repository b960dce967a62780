"""hardmine.data."""
