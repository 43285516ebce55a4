"""Reading traced programs in tests: which dtypes the matmuls run in."""


def dot_dtypes(jaxpr, found=None) -> list[tuple[int, str]]:
  """(rank, dtype) of the left operand of every dot_general in `jaxpr` (a Jaxpr or ClosedJaxpr) and the jaxprs
  nested in it (jit, custom_vjp, scan, ...)."""
  found = [] if found is None else found
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    if eqn.primitive.name == "dot_general":
      found.append((eqn.invars[0].aval.ndim, str(eqn.invars[0].aval.dtype)))
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        dot_dtypes(inner, found)
  return found
