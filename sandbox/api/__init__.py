"""The zone's API contract: the calls a client may make, and their wire form.

Imported by the thin client (``sandbox.client``), the CLI and the server alike; it imports
nothing that reads rows, keys or the ledger.
"""
