"""rtdp: real-time diffusion policies.

Importing ``rtdp`` is cheap: subpackages load torch, simulators and plotting
only when they are used.
"""

__version__ = "0.1.0"
