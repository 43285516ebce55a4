"""Writing files so that a failure never leaves a partial one behind."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import BinaryIO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> pathlib.Path:
  """Calls write(f) on a temporary file beside `path`, then renames it to `path`.

  write gets a file object, not a name: np.savez would append ".npz" to a name and the rename would miss it.
  """
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, out)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return out
