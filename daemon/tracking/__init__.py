"""Trackers: follow detected people between frames. One module per backend."""
