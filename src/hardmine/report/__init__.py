"""Reports: ``compare`` (tables of AP over methods and seeds), ``plots`` (loss curves, AP bars)."""
