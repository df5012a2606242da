"""Pure scaling core: demand from proxy reports -> desired replicas (policy.py), replica-hours and
their cost (capacity.py). No I/O and no clock: times are passed in; controller/scaler.py does the rest."""
