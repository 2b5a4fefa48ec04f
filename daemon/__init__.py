"""regionwatch: notices people entering regions of camera views and tells the world."""

__version__ = "0.1.0"
