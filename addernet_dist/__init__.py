"""addernet-dist: distributed, kernel-accelerated training of adder neural networks."""

__version__ = "0.1.0"
