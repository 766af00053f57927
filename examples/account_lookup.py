"""An example flow action: look up the account a caller keyed in, greet them by name, and
send gold customers to a priority queue.

A real action would ask a CRM over HTTP (``aiohttp``, with a timeout shorter than the
node's ``timeout_seconds``); this one reads a table, so the example runs anywhere, and
account ``OUTAGE`` plays the CRM being down. The flow that uses it is
``orchestrator/flows/account-lookup.yaml``; docs/call-flows.md walks through both.
"""

from __future__ import annotations

from orchestrator.actions import ActionCall, ActionResult

# account number -> (first name, tier): what the CRM would answer
ACCOUNTS: dict[str, tuple[str, str]] = {
    "12345678": ("Ada", "gold"),
    "87654321": ("Grace", "standard"),
}
OUTAGE = "99999999"  # looking this one up fails, as when the CRM is down


class CrmUnavailable(RuntimeError):
    """The CRM could not be asked: the flow's ``on_error`` takes the call on."""


async def find_account(call: ActionCall) -> ActionResult:
    """Sets ``name``; goes to ``priority`` for gold customers, ``not_found`` for an unknown
    account, else the node's ``next``."""
    account = call.variables.get("account", "")
    if account == OUTAGE:
        raise CrmUnavailable("the CRM did not answer")
    found = ACCOUNTS.get(account)
    if found is None:
        return ActionResult(next="not_found")
    name, tier = found
    return ActionResult(variables={"name": name}, next="priority" if tier == "gold" else None)
