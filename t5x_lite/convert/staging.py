"""Output directories written whole or not at all.

A writer fills a hidden temporary folder beside the output (`temp_dir_beside`) and renames it into place at the
end; on an error, Ctrl-C or (in the CLI) SIGTERM its `finally` removes the folder. A process killed outright
(SIGKILL, OOM killer) cannot clean up, so the folder's name carries the writer's pid and host: the next
`temp_dir_beside` in the same parent removes the folders whose process is provably gone (same host, no such
pid), and never one whose writer may still be running.
"""

import os
import re
import secrets
import shutil
import socket
import sys

from t5x_lite.errors import ConversionError

# .tmp-NAME-pidPID@HOST-HEX; the hex is anchored at the end, so NAME and HOST may contain '-'.
_TEMP_NAME = re.compile(r"^\.tmp-.*-pid(?P<pid>[0-9]+)@(?P<host>[^/]+)-[0-9a-f]{8}$")


def _host() -> str:
  """This machine's name as it appears in temporary folder names (no '/' or '@')."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temp_dir_beside(out_dir: str) -> str:
  """A new empty directory in `out_dir`'s parent (created if missing), to be renamed to `out_dir`; first removes
  the stale ones of dead writers there.

  Made with os.mkdir, so it gets the umask's permissions like any new directory; tempfile.mkdtemp's 0o700
  would stay on the exported directory after the rename.
  """
  parent, name = os.path.split(os.path.abspath(out_dir))
  tmp = os.path.join(parent, f".tmp-{name}-pid{os.getpid()}@{_host()}-{secrets.token_hex(4)}")
  try:
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_dirs(parent)
    os.mkdir(tmp)
  except OSError as e:
    # The user's path, not the temporary one, and no traceback for what is a bad --out.
    raise ConversionError(f"{out_dir}: cannot create the output directory ({e.strerror or e})") from None
  return tmp


def remove_stale_temp_dirs(parent: str) -> list[str]:
  """Removes the temporary folders in `parent` left by writers on this host whose process no longer exists;
  returns their paths. Folders of live or unknown processes, other hosts and other names are left alone."""
  removed = []
  for entry in sorted(os.listdir(parent)):
    match = _TEMP_NAME.match(entry)
    path = os.path.join(parent, entry)
    if not match or match["host"] != _host() or not os.path.isdir(path) or os.path.islink(path):
      continue
    if not _process_is_gone(int(match["pid"])):
      continue
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {path}: the temporary output of process {match['pid']}, which no longer runs", file=sys.stderr)
    removed.append(path)
  return removed


def _process_is_gone(pid: int) -> bool:
  """True only when no process `pid` exists here (a reused pid keeps the folder: safe, not tidy)."""
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError):  # another user's live process; a pid no process can have
    return False
  return False


def move_into_place(tmp: str, out_dir: str, *, last: tuple[str, ...] = ("config.json",)) -> None:
  """Renames `tmp` to `out_dir`, or when `out_dir` exists moves each entry of `tmp` into it (replacing files of
  the same name), the names in `last` at the end: a directory holding a config.json is complete."""
  if not os.path.exists(out_dir):
    os.rename(tmp, out_dir)
    return
  names = sorted(os.listdir(tmp), key=lambda n: (n in last, n))
  for name in names:
    os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
