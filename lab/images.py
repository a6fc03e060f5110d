"""The busybox image every emulated dockerd imports: a rootfs tarball built from the host's
static ``/bin/busybox`` (no registry, no network).  :meth:`lab.dockerd.DockerHost.import_busybox`
imports it as :data:`DEFAULT_IMAGE`."""

from __future__ import annotations

import atexit
import io
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

from lab.procs import NAME_PREFIX, HarnessError, run_command

__all__ = ["DEFAULT_IMAGE", "IMAGE_PATH_ENV", "busybox_rootfs_tar"]

DEFAULT_IMAGE = "calicnm-test/busybox:1"
IMAGE_PATH_ENV = "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin"
"""The Dockerfile instruction given to ``docker import``, so the applets are found."""


_rootfs_lock = threading.Lock()
_rootfs_tar: Path | None = None


def _remove_rootfs_cache() -> None:
    if _rootfs_tar is not None:
        shutil.rmtree(_rootfs_tar.parent, ignore_errors=True)


def busybox_rootfs_tar() -> Path:
    """Path of a tarball: static ``/bin/busybox`` plus a symlink per applet.

    Built once per Python process in a ``cnmt-img-*`` temp dir that is removed at exit.
    Raises :class:`HarnessError` if ``/bin/busybox`` is missing or not static.
    """
    global _rootfs_tar
    with _rootfs_lock:
        if _rootfs_tar is not None and _rootfs_tar.exists():
            return _rootfs_tar
        src = Path("/bin/busybox")
        if not src.exists():
            raise HarnessError("/bin/busybox missing (apt-get install busybox-static)")
        applets = run_command([str(src), "--list-full"]).stdout.split()
        if "bin/sh" not in applets:
            raise HarnessError("/bin/busybox has no sh applet; is it busybox-static?")
        tmpdir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-img-"))
        tar_path = tmpdir / "busybox-rootfs.tar"

        def add_dir(tf: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
            tf.addfile(info)

        def add_file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tf.addfile(info, io.BytesIO(data))

        try:
            with tarfile.open(tar_path, "w") as tf:
                for d in (
                    "bin",
                    "sbin",
                    "usr",
                    "usr/bin",
                    "usr/sbin",
                    "etc",
                    "proc",
                    "sys",
                    "dev",
                    "root",
                    "var",
                    "run",
                    "www",
                ):
                    add_dir(tf, d)
                add_dir(tf, "tmp", 0o1777)
                add_file(tf, "bin/busybox", src.read_bytes(), 0o755)
                for applet in applets:
                    if applet in ("bin/busybox", "linuxrc"):
                        continue
                    info = tarfile.TarInfo(applet)
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
                    tf.addfile(info)
                add_file(tf, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
                add_file(tf, "etc/group", b"root:x:0:\n")
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        if _rootfs_tar is None:
            atexit.register(_remove_rootfs_cache)
        _rootfs_tar = tar_path
        return tar_path
