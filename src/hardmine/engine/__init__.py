"""hardmine.engine."""
