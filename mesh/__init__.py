"""The shared runtime of every RecMesh process."""
