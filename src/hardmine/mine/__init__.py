"""hardmine.mine."""
