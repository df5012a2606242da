"""The control plane: thin kopf handlers over the pure cores."""
