"""The run's output folder (`job.dump_folder`): checked before any step, and held by one run at a time.

- `check_writable`: the checkpoint folder is created and written to at start-up, so an unwritable
  folder stops the run in one line before step 1, not at the first save after hours of training.
- `RunLock`: `<dump_folder>/run.lock` names the run that holds the folder (host, pid, start time).
  A second run on the same folder stops in one line naming the holder, so two runs never overwrite
  each other's checkpoints or mix their TensorBoard curves. The holder refreshes the file's mtime
  every HEARTBEAT_S from a background thread (also while it saves or validates); a lock is stale, and
  taken over with a warning, when its process is gone (same host) or its heartbeat is older than
  STALE_AFTER_S (another host, e.g. a killed SLURM job). Deleting the file by hand also releases it.
"""

import json
import os
import socket
import threading
import time

from remoe_recipe.config import ConfigError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def check_writable(folder: str, key: str = "checkpoint.folder") -> None:
    """Write a probe file in `folder`, or, while it does not exist yet, in its parent (created if needed);
    ConfigError naming the folder if that fails. The folder itself is not created: torchtitan reads a
    missing checkpoint folder as a fresh run, the only case where --checkpoint.initial_load_path applies."""
    where = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    probe = os.path.join(where, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(where, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: {folder} is not writable ({e.strerror or e}); choose another job.dump_folder") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, dump_folder: str):
        self.path = os.path.join(dump_folder, LOCK_NAME)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale holder this run replaced, for the log

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the live holder."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if not self._stale(held):
                    raise ConfigError(
                        f"job.dump_folder {os.path.dirname(self.path)} is in use by another run "
                        f"(host {held.get('host')}, pid {held.get('pid')}, started {held.get('started')}); "
                        f"choose another job.dump_folder, or delete {self.path} if that run is gone"
                    ) from None
                self.took_over = held
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise ConfigError(f"could not take {self.path}: another run took it at the same moment")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._read() == self.holder:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated by its age alone

    def _stale(self, held: dict) -> bool:
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            return not _pid_alive(held["pid"])
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return True
        return age > STALE_AFTER_S

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
