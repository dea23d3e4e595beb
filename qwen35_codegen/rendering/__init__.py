"""Spec -> Python: the Jinja templates (package data), black, the banner and atomic writes."""
