"""Reading traced programs in tests: which dtypes the matmuls run in, and the kernels' CUDA lowering."""
import jax

# The custom calls the Pallas kernels lower to (Triton, Mosaic GPU), which jax.export refuses unless told.
KERNEL_CALLS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")


def export_for_cuda(fn, *args):
  """jax.export of jit(fn) for CUDA on this CPU machine: Pallas lowers the kernels (Mosaic runs its own shape,
  layout and alignment checks as it does; Triton compiles only on a GPU)."""
  return jax.export.export(jax.jit(fn), platforms=["cuda"],
                           disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in KERNEL_CALLS])(*args)



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
