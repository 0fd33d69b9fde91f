"""recorun's CPU modules: generators, reconstruction, filters, analyzers and outputs.

Each is registered in the entry-point group ``recorun.modules`` (see ``pyproject.toml``).
"""
