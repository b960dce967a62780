"""hardmine.assign."""
