"""Call state machine definitions: declarative, no I/O."""

from states.call import LIVE_STATES, TRANSITIONS, State, Trigger, build_machine

__all__ = ["LIVE_STATES", "TRANSITIONS", "State", "Trigger", "build_machine"]
