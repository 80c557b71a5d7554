"""prefixkit.training: learns prefixes against a frozen backbone (PyTorch). May import the
runtime (prefix file format) and the exporter (backbone loading)."""
