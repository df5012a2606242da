"""Other writers of a scaled workload's replica count, and when the scaler leaves it alone.

Policy (issue #5, "no fight with other owners"):
  - A foreign write is a change of spec.replicas since the scaler last wrote (or first saw) it, or a
    field manager that newly server-side-applies f:spec/f:replicas (Argo CD / Flux declaring the
    count). The writer is named from metadata.managedFields: an owner of f:spec/f:replicas that was
    not there, or not at that time, when the scaler last wrote. Managers named spendwarden* are ours.
  - Kubernetes 1.20 records NO managedFields for writes through the scale subresource (`kubectl
    scale`, HPAs, KEDA; verified on the test control plane: neither manager nor time changes), so such
    a write is seen only as the changed count and named "unrecorded" (or after the manager that
    server-side-applies the count, if one does); 1.21+ records the manager.
  - Then the scaler writes nothing (condition ScalingConflict=True, reason ForeignReplicaWriter, one
    Warning Event) until the workload is annotated spendwarden.io/scaling=force (the scaler wins from
    then on) or the named manager no longer owns f:spec/f:replicas (an "unrecorded" writer cannot be
    seen to leave: only the annotation ends that conflict). Nor can a writer whose count the scaler
    itself wrote over (a cut-off's 0, the give-back): the apiserver moves f:spec/f:replicas off the
    other manager on that write, which is not the other manager letting go. Until it writes the
    count again, only the annotation ends that conflict too.
  - Budgets win over any other writer (an HPA included): while every namespace paying for the
    workload is cut off the scaler holds it at 0, remembering the other writer's count, and puts that
    count back after the reset. A cut-off team keeps no GPU warm, whoever set the replicas; at 0 an
    HPA stops scaling by itself (ScalingDisabled), so there is no fight with it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SCALER_MANAGER = "spendwarden-scaler"
OWN_MANAGER_PREFIX = "spendwarden"          # the scaler and the cut-off ("spendwarden")
SCALING_ANNOTATION = "spendwarden.io/scaling"
FORCE = "force"
UNRECORDED = "unrecorded"


@dataclass(frozen=True, slots=True)
class ReplicaOwner:
    """A managedFields entry that owns f:spec/f:replicas."""

    manager: str
    operation: str          # Apply | Update
    time: str | None
    subresource: str = ""   # "scale" for scale-subresource writes (Kubernetes 1.22+)


def replica_owners(managed_fields: Iterable[Mapping[str, Any]] | None) -> tuple[ReplicaOwner, ...]:
    out = []
    for entry in managed_fields or ():
        spec = ((entry.get("fieldsV1") or {}).get("f:spec")) or {}
        if isinstance(spec, Mapping) and "f:replicas" in spec:
            out.append(ReplicaOwner(str(entry.get("manager") or ""), str(entry.get("operation") or ""),
                                    entry.get("time"), str(entry.get("subresource") or "")))
    return tuple(out)


def is_own(manager: str) -> bool:
    return manager.startswith(OWN_MANAGER_PREFIX)


def forced(annotations: Mapping[str, str] | None) -> bool:
    return (annotations or {}).get(SCALING_ANNOTATION, "").strip().lower() == FORCE


@dataclass(frozen=True, slots=True)
class Written:
    """The count the scaler last wrote (or adopted when it first saw the workload) and the owners of
    f:spec/f:replicas just before: what a later read is compared with."""

    replicas: int
    owners: tuple[ReplicaOwner, ...]


def foreign_writer(written: Written | None, replicas: int, owners: tuple[ReplicaOwner, ...]) -> str | None:
    """The manager that wrote the replicas after the scaler (UNRECORDED when the apiserver did not
    say), or None. Nothing is foreign before the scaler has a first look (`written` None)."""
    if written is None:
        return None
    new = [o for o in owners if not is_own(o.manager) and o not in written.owners]
    applied = [o for o in new if o.operation == "Apply"]
    if replicas == written.replicas and not applied:
        return None   # an Update of other fields by an old owner of replicas bumps its time: no fight
    if not new:
        # No owner is new, yet the count changed: a scale-subresource write (unrecorded on 1.20), or a
        # re-apply by a declared owner within the same second (managedFields time has 1 s
        # resolution, so its entry reads unchanged). A foreign Apply owner declares the count and
        # its next sync would set it anyway: it is the writer the scaler must not fight.
        new = [o for o in owners if not is_own(o.manager) and o.operation == "Apply"]
    named = sorted(applied or new, key=lambda o: o.time or "")
    return named[-1].manager if named else UNRECORDED


def still_foreign(manager: str, owners: tuple[ReplicaOwner, ...], annotations: Mapping[str, str] | None,
                  overwritten: bool = False) -> bool:
    """`overwritten`: the scaler wrote the count since the manager last did, so its ownership is gone
    from managedFields whether or not it let go."""
    if forced(annotations):
        return False
    return manager == UNRECORDED or overwritten or any(o.manager == manager for o in owners)


@dataclass(slots=True)
class Ownership:
    """One workload's side of the policy, kept by the scaler between ticks."""

    written: Written | None = None
    foreign: str | None = None       # the other writer's manager while the scaler leaves it alone
    before_cut: int | None = None    # the other owner's count while a budget cut holds it at 0
    overwritten: bool = False        # the scaler wrote over the foreign writer's count (see still_foreign)

    def observe(self, replicas: int, owners: tuple[ReplicaOwner, ...], annotations: Mapping[str, str] | None,
                autoscaler: bool = False) -> bool:
        """A fresh read of the workload. Returns True when a foreign writer is newly detected.
        `autoscaler`: an HPA targets it (reported as such; its writes are not foreign writes)."""
        if self.foreign is not None and any(o.manager == self.foreign for o in owners):
            self.overwritten = False   # it owns the count again: its letting go would show
        if self.foreign is not None and not still_foreign(self.foreign, owners, annotations, self.overwritten):
            self.foreign, self.written = None, None   # recovered: the scaler takes the count from here
            self.overwritten = False
        if self.written is None or autoscaler or forced(annotations):
            self.written = Written(replicas, owners)  # what later reads are compared with
            return False
        if self.foreign is not None:
            return False
        self.foreign = foreign_writer(self.written, replicas, owners)
        return self.foreign is not None

    def target(self, desired: int, cut_off: bool, replicas: int, other_owner: bool) -> int | None:
        """The count to write now, or None to leave the workload alone. `other_owner`: a foreign
        writer or an HPA owns the count."""
        if not other_owner:
            self.before_cut = None
            return desired
        if cut_off:   # budgets win: see the module docstring
            if replicas != 0:
                self.before_cut = replicas
            return 0
        if self.before_cut is not None:
            count, self.before_cut = self.before_cut, None
            return count if replicas == 0 else None   # someone set a count meanwhile: theirs stands
        return None

    def wrote(self, replicas: int, owners: tuple[ReplicaOwner, ...]) -> None:
        self.written = Written(replicas, owners)
        if self.foreign is not None:
            self.overwritten = True
