"""Hydra configs of sam-repro (a package so they ship with it and Hydra finds them when installed)."""
