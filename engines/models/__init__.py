"""Model definitions used at export time (they import torch; the server never imports this package)."""
