"""The internal services of the mesh, one package each."""
