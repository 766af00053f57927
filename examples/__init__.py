"""Examples of the user code a call flow can run (``type: action`` nodes)."""
