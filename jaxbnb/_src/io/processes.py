"""Reading and writing files in a run that spans several processes.

With several processes (hosts, `jax.distributed`) every one runs the same
program. Files are written once, by process 0, into a folder all of them
can read (a shared file system); the processes wait for each other around
each write, so none reads a folder another is still writing. Orbax
checkpoints are the exception: every process writes its own shards (orbax
coordinates them). An error one process meets while reading or writing is
shared (`all_succeeded`, `errors_of_all`), so the others stop too instead
of waiting for it.

With one process every function here is a no-op or the obvious value.
"""

from __future__ import annotations

import secrets

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["all_succeeded", "errors_of_all", "is_primary", "several",
           "shared_token", "sync"]


def several() -> bool:
  """Whether this run spans several processes."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process has reached `sync(name)`."""
  if several():
    multihost_utils.sync_global_devices(name)


def shared_token() -> str:
  """A random 8-hex-digit token, the same in every process (process 0's)."""
  token = secrets.token_hex(4)
  if not several():
    return token
  raw = np.frombuffer(bytes.fromhex(token), np.uint8)
  return bytes(np.asarray(
      multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8)).hex()


def all_succeeded(ok: bool) -> bool:
  """Whether `ok` holds in every process (all must call this)."""
  if not several():
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


_MESSAGE_BYTES = 2048


def errors_of_all(message: str | None) -> list[str | None]:
  """Every process's `message` (None: no error), by process index.

  All processes must call this. Messages are cut to 2 KiB (UTF-8)."""
  if not several():
    return [message]
  raw = np.zeros((_MESSAGE_BYTES + 1,), np.uint8)
  if message is not None:
    data = message.encode("utf-8")[:_MESSAGE_BYTES]
    raw[0] = 1
    raw[1:1 + len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(raw)).reshape(
      -1, _MESSAGE_BYTES + 1)
  return [bytes(r[1:]).rstrip(b"\0").decode("utf-8", "replace") if r[0]
          else None for r in rows]
