"""A storage root as an operator writes it (a path, file://PATH, s3://BUCKET/PREFIX) -> its Storage.

Kept apart from patching/storage.py, the interface every medium implements, so that a medium's
module imports the interface and this module imports the media, and nothing imports in a circle.
"""

from __future__ import annotations

import re
from pathlib import Path

from patching.s3storage import S3Options, S3Storage
from patching.storage import FileStorage, Storage, StorageSetupError


def open_storage(root: str | Path | Storage, s3: S3Options | None = None) -> Storage:
    """A Storage for a path or URI: a plain path or file:// is a (local or NFS) file system,
    s3://bucket/prefix an object store (patching/s3storage.py; `s3` says how to reach it, else
    the AWS SDK's own configuration: AWS_* variables, ~/.aws, an instance role)."""
    if isinstance(root, Storage):
        return root
    text = str(root)
    if text.startswith("file://"):
        return FileStorage(text[len("file://") :])
    if text.startswith("s3://"):
        return S3Storage(text, s3)
    scheme = re.match(r"([a-z][a-z0-9+.-]*)://", text)
    if scheme:
        raise StorageSetupError(
            "root", f"{text!r}: the {scheme.group(1)}:// scheme is not supported; use a path, file:// or s3://"
        )
    return FileStorage(text)
