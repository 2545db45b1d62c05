"""The subcommands the tools add to ``order-sidecar``.

Registered in the entry-point group ``order_sidecar.commands`` (pyproject.toml).
"""
