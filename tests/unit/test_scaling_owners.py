"""Other writers of a scaled workload's replicas (scaling/owners.py): detection from managedFields and
from a changed count, recovery, and budgets winning over them."""
from __future__ import annotations

from spendwarden.scaling.owners import (
    UNRECORDED,
    Ownership,
    ReplicaOwner,
    Written,
    foreign_writer,
    replica_owners,
    still_foreign,
)

FORCE = {"spendwarden.io/scaling": "force"}


def entry(manager: str, operation: str = "Update", time: str = "2026-01-01T00:00:00Z", replicas: bool = True,
          subresource: str | None = None) -> dict:
    spec = {"f:replicas": {}, "f:template": {}} if replicas else {"f:template": {}}
    out = {"manager": manager, "operation": operation, "apiVersion": "apps/v1", "time": time,
           "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": spec}}
    if subresource:
        out["subresource"] = subresource
    return out


CREATOR = entry("kubectl-create", time="2026-01-01T00:00:00Z")


def test_replica_owners_are_the_entries_owning_spec_replicas():
    fields = [CREATOR, entry("kube-controller-manager", replicas=False),
              {"manager": "odd", "operation": "Update"}, entry("kubectl", subresource="scale")]
    assert replica_owners(fields) == (ReplicaOwner("kubectl-create", "Update", "2026-01-01T00:00:00Z"),
                                      ReplicaOwner("kubectl", "Update", "2026-01-01T00:00:00Z", "scale"))
    assert replica_owners(None) == ()


def test_a_changed_count_without_a_new_owner_is_an_unrecorded_writer():
    # Kubernetes 1.20: a write through the scale subresource (kubectl scale) leaves managedFields as is.
    owners = replica_owners([CREATOR])
    assert foreign_writer(Written(3, owners), 3, owners) is None
    assert foreign_writer(Written(3, owners), 5, owners) == UNRECORDED
    assert foreign_writer(None, 5, owners) is None, "nothing is foreign before the first look"


def test_the_writer_is_named_by_the_owner_that_is_new_since_the_scalers_write():
    before = replica_owners([CREATOR])
    argo = replica_owners([entry("argocd-controller", "Apply", "2026-01-01T00:05:00Z")])
    assert foreign_writer(Written(3, before), 1, argo) == "argocd-controller"
    # the same manager writing again later: a new time is a new write
    later = replica_owners([entry("argocd-controller", "Apply", "2026-01-01T00:09:00Z")])
    assert foreign_writer(Written(3, argo), 1, later) == "argocd-controller"
    # the newest of several new owners
    two = replica_owners([entry("helm", time="2026-01-01T00:05:00Z"), entry("rollouts-controller", time="2026-01-01T00:07:00Z")])
    assert foreign_writer(Written(3, before), 0, two) == "rollouts-controller"


def test_a_changed_count_under_a_declared_owner_names_it_also_within_the_same_second():
    # Argo CD re-applies replicas=1 in the second of its first apply: managedFields reads the same.
    argo = replica_owners([CREATOR, entry("argocd-controller", "Apply", "2026-01-01T00:05:00Z")])
    assert foreign_writer(Written(3, argo), 1, argo) == "argocd-controller"
    assert foreign_writer(Written(3, argo), 3, argo) is None, "the count the scaler wrote: no fight"


def test_an_apply_of_replicas_is_foreign_even_with_the_same_count_an_update_of_other_fields_is_not():
    before = replica_owners([entry("helm", time="2026-01-01T00:00:00Z")])
    # helm upgraded the image: its entry's time moved, it still owns replicas, the count is the scaler's
    assert foreign_writer(Written(3, before), 3, replica_owners([entry("helm", time="2026-01-01T01:00:00Z")])) is None
    # a GitOps tool server-side-applies spec.replicas: it declares the count (its next sync would fight)
    assert foreign_writer(Written(3, before), 3, replica_owners([entry("flux", "Apply", "2026-01-01T01:00:00Z")])) == "flux"


def test_own_managers_are_never_foreign():
    before = replica_owners([CREATOR])
    ours = replica_owners([entry("spendwarden-scaler", time="2026-01-01T00:05:00Z", subresource="scale"),
                           entry("spendwarden", "Apply", time="2026-01-01T00:05:00Z")])
    assert foreign_writer(Written(3, before), 3, ours) is None


def test_recovery_when_the_manager_lets_go_or_the_workload_is_forced():
    argo = replica_owners([entry("argocd-controller", "Apply")])
    assert still_foreign("argocd-controller", argo, {})
    assert not still_foreign("argocd-controller", replica_owners([CREATOR]), {})
    assert not still_foreign("argocd-controller", argo, FORCE)
    assert still_foreign(UNRECORDED, (), {}), "an unrecorded writer cannot be seen to leave"
    assert not still_foreign(UNRECORDED, (), {"spendwarden.io/scaling": " Force "})


def test_ownership_kubectl_scale_then_force_then_back_to_normal():
    own = Ownership()
    owners = replica_owners([CREATOR])
    assert not own.observe(1, owners, {})             # first look: adopted
    assert own.target(3, False, 1, False) == 3
    own.wrote(3, owners)
    assert not own.observe(3, owners, {})
    assert own.observe(5, owners, {}) and own.foreign == UNRECORDED   # kubectl scale --replicas=5
    assert not own.observe(5, owners, {}), "reported once"
    assert own.target(3, False, 5, True) is None
    assert not own.observe(5, owners, FORCE) and own.foreign is None
    assert own.target(3, False, 5, False) == 3
    own.wrote(3, owners)
    assert not own.observe(3, owners, {}), "annotation removed: the scaler's count is the reference"


def test_ownership_recovers_when_the_gitops_tool_drops_replicas():
    own = Ownership()
    own.observe(2, replica_owners([entry("argocd-controller", "Apply", "2026-01-01T00:00:00Z")]), {})
    own.wrote(4, replica_owners([entry("argocd-controller", "Apply", "2026-01-01T00:00:00Z")]))
    synced = replica_owners([entry("argocd-controller", "Apply", "2026-01-01T00:10:00Z")])
    assert own.observe(2, synced, {}) and own.foreign == "argocd-controller"
    released = replica_owners([entry("argocd-controller", "Apply", "2026-01-01T00:20:00Z", replicas=False)])
    assert not own.observe(2, released, {}) and own.foreign is None
    assert own.written == Written(2, ())


def test_an_hpa_is_not_a_foreign_writer_and_its_count_is_adopted():
    own = Ownership()
    own.observe(2, (), {})
    assert not own.observe(6, (), {}, autoscaler=True) and own.foreign is None
    assert not own.observe(6, (), {}), "HPA deleted: its last count is the reference, not a foreign write"


def test_budgets_win_over_another_writer_and_its_count_comes_back_after_the_reset():
    own = Ownership(foreign=UNRECORDED)
    assert own.target(0, True, 5, True) == 0 and own.before_cut == 5
    own.wrote(0, ())
    assert own.target(0, True, 4, True) == 0 and own.before_cut == 4, "it wrote again while cut: latest count kept"
    assert own.target(2, False, 0, True) == 4, "the reset: the other writer's count back"
    assert own.target(2, False, 4, True) is None, "then left alone again"
    # someone set a count during the cut's last moments: theirs stands
    own = Ownership(foreign=UNRECORDED, before_cut=3)
    assert own.target(2, False, 1, True) is None and own.before_cut is None
    # no other owner: the scaler's decision (0 while cut off) and nothing remembered
    own = Ownership(before_cut=3)
    assert own.target(0, True, 2, False) == 0 and own.before_cut is None


def test_the_scalers_cut_off_write_is_not_the_named_writer_letting_go():
    # Kubernetes 1.22+: kubectl scale is recorded (subresource scale, no time), and the scaler's own
    # write through the scale subresource then takes f:spec/f:replicas off kubectl.
    own = Ownership()
    own.observe(1, replica_owners([CREATOR]), {})
    kubectl = replica_owners([entry("kubectl", time=None, subresource="scale")])
    assert own.observe(4, kubectl, {}) and own.foreign == "kubectl"
    assert own.target(0, True, 4, True) == 0 and own.before_cut == 4
    own.wrote(0, kubectl)
    assert not own.observe(0, (), {}) and own.foreign == "kubectl", "our write moved the field, kubectl did not let go"
    assert own.target(1, False, 0, True) == 4, "the reset: kubectl's count back"
    own.wrote(4, ())
    assert not own.observe(4, (), {}) and own.foreign == "kubectl"
    assert own.target(1, False, 4, True) is None, "then left alone again"
    # kubectl writes again: it owns the count again, and is seen to let go from then on
    assert not own.observe(3, kubectl, {}) and not own.overwritten
    assert not own.observe(3, replica_owners([entry("argocd-controller", "Apply")]), {}) and own.foreign is None
    # the annotation ends it while overwritten too
    own = Ownership(foreign="kubectl", overwritten=True)
    assert not own.observe(0, (), FORCE) and own.foreign is None and not own.overwritten
