"""Triton glue: model repository configs, the Python-backend models, the server launcher."""
