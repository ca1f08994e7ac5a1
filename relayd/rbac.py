"""Role-based access as Azure does it: roles on nested scopes, highest wins.

reader < contributor < owner. An assignment on a subscription covers every
VM in it; on a resource group, its VMs and scale sets; on a scale set, its
instances; on a VM, that VM (`/subscriptions/{sub}/vms/{vm}` or the full
Azure resource path).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .auth import Principal
from .config import Role, RoleAssignment, VmConfig, vm_scopes

RANK: dict[str, int] = {"reader": 1, "contributor": 2, "owner": 3}


def at_least(role: Role | None, needed: Role) -> bool:
    """Whether `role` grants what `needed` grants."""
    return role is not None and RANK[role] >= RANK[needed]


class Rbac:
    """The effective role of a principal on a VM."""

    def __init__(self, assignments: Iterable[RoleAssignment]) -> None:
        self._by_principal: dict[str, list[tuple[str, Role]]] = defaultdict(list)
        for ra in assignments:
            self._by_principal[ra.principal].append((ra.scope.rstrip("/"), ra.role))

    def role(self, principal: Principal, vm: VmConfig) -> Role | None:
        """The highest role any of the principal's names holds on any scope containing the VM."""
        return self.role_on(principal, vm_scopes(vm))

    def role_on(self, principal: Principal, scopes: tuple[str, ...]) -> Role | None:
        """The highest role held on any of `scopes` (a scope and those containing it)."""
        best: Role | None = None
        for name in principal.names:
            for scope, role in self._by_principal.get(name, ()):
                if scope in scopes and (best is None or RANK[role] > RANK[best]):
                    best = role
        return best
