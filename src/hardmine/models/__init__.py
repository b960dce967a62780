"""hardmine.models."""
