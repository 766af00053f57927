"""The call orchestrator: load a call, run the machine, commit, then speak."""
